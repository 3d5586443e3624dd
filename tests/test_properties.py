"""Property tests (hypothesis): random bytes as images and randomly corrupted manifests never give a
traceback, always give the right exit code, and never stop a good image from being captioned.

Examples are bounded (each CLI example is a real `palionnx caption` process) and derandomized, so the
suite stays fast and repeatable; the in-process manifest property runs many more examples.
"""

import io
import json
import shutil
import tempfile
from pathlib import Path

from helpers import palionnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from palionnx.runtime.contract import MANIFEST_NAME
from palionnx.runtime.manifest import Manifest, ModelFolderError
from palionnx.samples import sample_images

CLI = settings(max_examples=8, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FAST = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _png_bytes(seed: int) -> bytes:
    out = io.BytesIO()
    sample_images(4, size=40)[seed % 4].save(out, format="PNG")
    return out.getvalue()


@st.composite
def bad_image_bytes(draw) -> bytes:
    """Random bytes, or a real PNG truncated or with bytes overwritten (which may still decode)."""
    kind = draw(st.sampled_from(["random", "truncated", "flipped"]))
    if kind == "random":
        return draw(st.binary(max_size=3000))
    data = bytearray(_png_bytes(draw(st.integers(0, 3))))
    if kind == "truncated":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def _good_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i, image in enumerate(sample_images(2, size=40)):
        image.save(folder / f"good{i}.png")
        paths.append(folder / f"good{i}.png")
    return paths


@CLI
@given(files=st.lists(st.tuples(bad_image_bytes(), st.sampled_from([".png", ".jpg", ".webp", ".gif"])),
                      min_size=1, max_size=4))
def test_random_bytes_as_images(model, files):
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        good = _good_images(data)
        bad = []
        for i, (content, ext) in enumerate(files):
            (data / f"bad{i}{ext}").write_bytes(content)
            bad.append(data / f"bad{i}{ext}")
        run = palionnx("caption", data, "--model", model, "--max-new-tokens", 4)
        assert "Traceback" not in run.stderr, run.stderr
        errors = [line for line in run.stderr.splitlines() if "error: " in line]  # "[2/3] error: ..." per image
        assert all(path.with_suffix(".txt").is_file() for path in good)
        for path in bad:
            named = [line for line in errors if f"{path.name}:" in line]
            assert path.with_suffix(".txt").is_file() != bool(named), (path.name, run.stderr)
            assert len(named) <= 1
        assert run.returncode == (1 if errors else 0), run.stderr


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


@st.composite
def corruption(draw, manifest: dict):
    """A change to palionnx.json: a key dropped or given any JSON value (at the top or one level down),
    the text cut short, or random bytes. Returns the new file content."""
    data = json.loads(json.dumps(manifest))
    kind = draw(st.sampled_from(["drop", "replace", "replace-nested", "truncate", "bytes"]))
    text = json.dumps(data, indent=2)
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))].encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    key = draw(st.sampled_from(sorted(data)))
    if kind == "drop":
        del data[key]
    elif kind == "replace" or not isinstance(data[key], dict) or not data[key]:
        data[key] = draw(JSON)
    else:
        inner = draw(st.sampled_from(sorted(data[key])))
        data[key][inner] = draw(JSON)
    return json.dumps(data).encode()


def _manifest_of(model: Path) -> dict:
    return json.loads((model / MANIFEST_NAME).read_text())


@FAST
@given(data=st.data())
def test_corrupted_manifest_loads_or_names_the_problem(numpy_folder, data, tmp_path_factory):
    model = numpy_folder("tiny-pg1")
    folder = tmp_path_factory.getbasetemp() / "corrupted-in-process"
    if not folder.exists():
        shutil.copytree(model, folder)
    (folder / MANIFEST_NAME).write_bytes(data.draw(corruption(_manifest_of(model))))
    try:
        Manifest.load(folder)
    except ModelFolderError as exc:
        assert str(exc) and "\n" not in str(exc)


@CLI
@given(data=st.data())
def test_corrupted_manifest_on_the_command_line(model, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(model, folder)
        (folder / MANIFEST_NAME).write_bytes(data.draw(corruption(_manifest_of(model))))
        images = _good_images(Path(tmp) / "data")
        run = palionnx("caption", images[0].parent, "--model", folder, "--max-new-tokens", 4)
        assert "Traceback" not in run.stderr, run.stderr
        errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        if run.returncode == 2:
            assert len(errors) == 1 and not any(p.with_suffix(".txt").exists() for p in images), run.stderr
        else:  # the change was harmless: everything captioned
            assert run.returncode == 0 and not errors, run.stderr
            assert all(p.with_suffix(".txt").is_file() for p in images)
