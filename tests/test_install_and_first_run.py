"""Installing and the first run. Extras and the missing-onnxruntime error, the console script's
behaviour under Ctrl-C and SIGTERM, doctor, models from a hub cache laid out on disk (offline, never the
network), the first-use export plan, `palionnx models`, help screens, progress and tables, the scripts."""

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from helpers import captions, palionnx

from palionnx.samples import sample_images

ROOT = Path(__file__).parents[1]
SCRIPT = Path(sys.executable).parent / "palionnx"  # the console script pip installed


def console(*args, env=None, **kwargs):
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kwargs)


def images(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(sample_images(count, size=40)):
        image.save(folder / f"{i}.png")
    return folder


# --- extras and the missing-onnxruntime error ---

def test_base_package_depends_on_no_onnxruntime_flavour():
    requires = metadata.requires("palionnx")
    unconditional = [r for r in requires if "extra ==" not in r]
    assert not [r for r in unconditional if r.startswith("onnxruntime")], unconditional

    def extra(name):
        return [r.split(";")[0].replace(" ", "") for r in requires if f'extra == "{name}"' in r]

    assert extra("cpu") == ["onnxruntime>=1.22"]
    assert extra("gpu") == ["onnxruntime-gpu[cuda,cudnn]>=1.22"]
    assert extra("gpu-cu12") == ["onnxruntime-gpu[cuda,cudnn]<1.27,>=1.22"]


def _shim(tmp_path: Path, module: str) -> dict:
    """PYTHONPATH with a package `module` that fails to import, as when it is not installed."""
    shim = tmp_path / "shim" / module
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(f'raise ModuleNotFoundError("No module named {module!r}", name={module!r})\n')
    return {"PYTHONPATH": f"{shim.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_import_without_onnxruntime_names_both_extras(tmp_path):
    env = _shim(tmp_path, "onnxruntime")
    imported = subprocess.run([sys.executable, "-c", "import palionnx"], capture_output=True, text=True,
                              env={**os.environ, **env})
    assert imported.returncode == 1
    last = imported.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: palionnx needs onnxruntime")
    assert "pip install 'palionnx[cpu]'" in last and "'palionnx[gpu]'" in last

    for command in (["doctor"], ["caption", tmp_path, "--model", tmp_path]):
        run = console(*command, env=env)
        assert run.returncode == 2 and run.stdout == ""
        assert run.stderr.splitlines() == [f"error: {last.removeprefix('ImportError: ')}"]


def test_sigint_while_importing_is_not_a_traceback(tmp_path, model):
    data = images(tmp_path / "data", 1)
    outcomes = set()
    for delay in (0.05, 0.15, 0.3, 0.5):
        process = subprocess.Popen([str(SCRIPT), "caption", str(data), "--model", str(model), "--overwrite"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
        assert process.returncode in (130, -signal.SIGINT, 0), stderr
        if process.returncode == 130:
            assert stderr.strip().splitlines()[-1] == "interrupted"
        outcomes.add(process.returncode)
    assert 130 in outcomes


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path, model):
    data = images(tmp_path / "data", 30)
    process = subprocess.Popen([str(SCRIPT), "caption", str(data), "--model", str(model), "--max-new-tokens", "200",
                                "--batch-size", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(list(data.glob("*.txt"))) < 3 and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert "stopped early" in stderr and stderr.strip().splitlines()[-1] == "interrupted"
    assert not [p for p in data.iterdir() if p.name.startswith(".")]  # claims released, no temp files
    assert palionnx("caption", data, "--model", model, "--max-new-tokens", 200, "--batch-size", 1).returncode == 0
    assert len(captions(data)) == 30


# --- doctor ---

def test_doctor_reports_this_machine(tmp_path):
    run = console("doctor", env={"PALIONNX_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr
    rows = dict(line.split(None, 1) for line in run.stdout.splitlines() if line.strip() and "  " in line)
    import onnxruntime

    from palionnx import __version__

    assert rows["palionnx"].strip() == __version__
    assert onnxruntime.__version__ in rows["onnxruntime"] and "onnxruntime " in rows["onnxruntime"]
    assert "CPUExecutionProvider" in run.stdout and "cpu features" in run.stdout and "AVX2" in run.stdout
    assert str(tmp_path / "cache") in run.stdout and "GB free" in run.stdout
    assert "--quant" in rows["recommended"] and "--batch-size" in rows["recommended"]


@pytest.mark.integration  # starts every provider's probe session: too slow for the unit tier
def test_doctor_exit_status_follows_the_requested_device():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine's onnxruntime has CUDA")
    run = console("doctor", "--device", "cuda")
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in errors if "CUDAExecutionProvider" in line and "palionnx[gpu]" in line]
    assert len(errors) == 1
    assert console("doctor", "--device", "cpu").returncode == 0
    assert console("doctor", "--device", "tpu").returncode == 2


def test_doctor_pieces():
    import onnx
    from onnx import TensorProto, helper

    from palionnx.cli.doctor import PROBE_MODEL, failure_reason, provider_starts, recommend

    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8,
                              producer_name="palionnx")
    assert model.SerializeToString() == PROBE_MODEL and onnx.checker.check_model(model) is None
    assert provider_starts("CPUExecutionProvider") == (True, "")
    log = ("[E:onnxruntime:Default, provider_bridge_ort.cc:2251] Failed to load library "
           "libonnxruntime_providers_cuda.so with error: libcudnn_adv.so.9: cannot open shared object file")
    assert "missing library libcudnn_adv.so.9" in failure_reason(log)
    assert "cannot load onnxruntime_providers_cuda.dll" in failure_reason(
        'LoadLibrary failed with error 126 "" when trying to load "C:\\ort\\onnxruntime_providers_cuda.dll"')
    gb = 1e9
    assert recommend(True, 40 * gb, 64 * gb, None).startswith("--device cuda --quant fp16 --batch-size 64")
    assert recommend(True, 12 * gb, 64 * gb, None).startswith("--device cuda --quant fp16 --batch-size 16")
    assert recommend(True, 6 * gb, 64 * gb, None).startswith("--device cuda --quant int4 --batch-size 8")
    assert recommend(False, None, 16 * gb, {"avx512_vnni"}).startswith("--device cpu --quant int4 --batch-size 32")
    assert "VNNI" in recommend(False, None, 16 * gb, {"avx512_vnni"})
    assert recommend(False, None, 4 * gb, set()).startswith("--device cpu --quant int4 --batch-size 1")
    assert "only 2.0 GB" in recommend(False, None, 2 * gb, set())


def test_other_accelerators_fail_loudly_and_start_when_present(monkeypatch, tmp_path):
    import onnxruntime as ort

    from palionnx.runtime import sessions

    class FakeSession:
        def __init__(self, path, sess_options=None, providers=()):
            self.providers = list(providers)

        def get_providers(self):
            return self.providers

    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    paths = {"decoder": tmp_path / "decoder.onnx"}
    for device, provider, hint in [("directml", "DmlExecutionProvider", "onnxruntime-directml"),
                                   ("coreml", "CoreMLExecutionProvider", "macOS")]:
        monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
        with pytest.raises(sessions.DeviceError, match=f"{provider}.*{hint}"):
            sessions.open_sessions(paths, device)
        monkeypatch.setattr(ort, "get_available_providers", lambda p=provider: [p, "CPUExecutionProvider"])
        opened, memory_device = sessions.open_sessions(paths, device)
        assert opened["decoder"].get_providers()[0] == provider and memory_device == "cpu"
        assert sessions.open_sessions(paths, "auto")[0]["decoder"].get_providers() == ["CPUExecutionProvider"]


# --- models from the hub cache (offline), first-use export, `palionnx models` ---

def lay_out_hub_cache(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """A repository in a huggingface_hub cache as the hub client writes it: refs/main, blobs, symlinks."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, source in files.items():
        data = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root / "snapshots" / commit


def offline(tmp_path: Path) -> dict:
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PALIONNX_CACHE": str(tmp_path / "cache")}


def _torch_free(tmp_path: Path, env: dict) -> dict:
    """`env` plus shims that make importing torch or transformers fail: the run must not need them."""
    paths = [_shim(tmp_path / name, name)["PYTHONPATH"].split(os.pathsep)[0] for name in ("torch", "transformers")]
    return {**env, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}


def test_pre_exported_hub_model_offline_without_torch(tmp_path, exported):
    env = offline(tmp_path)
    levels = {level: exported("tiny-pg1", level) for level in ("int4", "fp32")}
    files = {f"{level}/{p.name}": p for level, folder in levels.items() for p in folder.iterdir()}
    lay_out_hub_cache(tmp_path / "hub", "someone/pg-tiny-onnx", files)
    data = images(tmp_path / "data")
    no_torch = _torch_free(tmp_path, env)

    run = console("caption", data, "--model", "someone/pg-tiny-onnx", "--max-new-tokens", 6, env=no_torch)
    assert run.returncode == 0, run.stderr
    assert "(int4)" in run.stderr and "exporting" not in run.stderr and len(captions(data)) == 2
    run = console("caption", data, "--model", "someone/pg-tiny-onnx", "--quant", "fp32", "--overwrite", env=no_torch)
    assert run.returncode == 0 and "(fp32)" in run.stderr, run.stderr
    run = console("caption", data, "--model", "someone/pg-tiny-onnx", "--quant", "int8", env=no_torch)
    assert run.returncode == 2 and "holds exports at fp32, int4, not int8" in run.stderr

    lay_out_hub_cache(tmp_path / "hub", "someone/root-export", {p.name: p for p in levels["int4"].iterdir()})
    run = console("caption", data, "--model", "someone/root-export", "--overwrite", env=no_torch)
    assert run.returncode == 0 and "(int4)" in run.stderr, run.stderr

    listed = console("models", env=env)
    assert listed.returncode == 0
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert sorted((r[0], r[1]) for r in rows) == [("someone/pg-tiny-onnx", "fp32"), ("someone/pg-tiny-onnx", "int4"),
                                                  ("someone/root-export", "int4")]
    assert all("downloaded" in line for line in listed.stdout.splitlines()[1:])


def test_hub_checkpoint_is_exported_once_with_a_plan_then_listed_and_removed(tmp_path, checkpoints):
    env = offline(tmp_path)
    lay_out_hub_cache(tmp_path / "hub", "someone/pg-tiny", {p.name: p for p in checkpoints["tiny-pg1"].iterdir()})
    data = images(tmp_path / "data", 1)
    first = console("caption", data, "--model", "someone/pg-tiny", "--max-new-tokens", 6, env=env)
    assert first.returncode == 0, first.stderr
    plan = [line for line in first.stderr.splitlines() if line.startswith(("first use", "needs:"))]
    assert plan[0].startswith("first use of someone/pg-tiny: exporting it once at int4")
    assert "of RAM" in plan[1] and "on disk" in plan[1] and "checkpoint in the hub cache" in plan[1]
    assert first.stderr.index(plan[1]) < first.stderr.index("reading checkpoint")  # told before it starts
    folder = tmp_path / "cache" / "models" / "someone--pg-tiny" / "int4"
    assert (folder / "palionnx.json").is_file() and not [p for p in folder.parent.iterdir() if p.name[0] == "."]

    again = console("caption", data, "--model", "someone/pg-tiny", "--overwrite", env=env)
    assert again.returncode == 0 and "first use" not in again.stderr

    listed = console("models", env=env)
    assert "someone/pg-tiny" in listed.stdout and "exported" in listed.stdout and str(folder) in listed.stdout
    removed = console("models", "rm", "someone/pg-tiny", env=env)
    assert removed.returncode == 0 and "removed someone/pg-tiny int4" in removed.stdout
    assert not (tmp_path / "cache" / "models" / "someone--pg-tiny").exists()
    assert console("models", "rm", "someone/pg-tiny", env=env).returncode == 2
    assert "no cached models" in console("models", env=env).stderr


def test_export_plan_scales_the_measured_export_and_refuses_what_cannot_fit():
    from palionnx.cli.export_plan import GB, checkpoint_estimate, embedding_size, estimate, parameter_count, shortfall

    files = {"model.safetensors": int(5.84e9), "config.json": 1000}
    params = parameter_count(files, {"torch_dtype": "bfloat16"})
    assert params == pytest.approx(2.92e9)
    assert parameter_count(files, {"torch_dtype": "float32"}) == pytest.approx(1.46e9)
    plan = estimate(params, "int4", download_bytes=int(5.84e9))
    assert plan.peak_ram_bytes == pytest.approx(6.1 * GB) and plan.seconds == pytest.approx(198)
    # not knowing the machine, the int8 prefill graph is counted: the layers' weights at a byte each
    assert plan.prefill_graph_bytes == pytest.approx(params - 0.43e9)
    assert plan.folder_bytes == pytest.approx(1.85 * GB + plan.prefill_graph_bytes)
    assert plan.scratch_bytes == pytest.approx(1.66 * GB)
    assert "download 5.8 GB" in plan.describe() and "3 min 18 s" in plan.describe()
    assert shortfall(plan, available_ram=64 * GB, free_disk=100 * GB) is None
    assert "6.1 GB of RAM" in shortfall(plan, available_ram=3 * GB, free_disk=100 * GB)
    assert "11.8 GB of disk and 5.0 GB is free" in shortfall(plan, available_ram=64 * GB, free_disk=5 * GB)
    assert estimate(params / 2, "fp16", 0).peak_ram_bytes == pytest.approx(1.8 * GB)
    # the figures measured with an int8 prefill graph on this 24 GB machine (README, Export; Quant levels)
    three_b = estimate(params, "int4", 0, 257_216 * 2048, total_ram=24 * GB)
    assert three_b.folder_bytes == pytest.approx(3.77 * GB, rel=0.1)
    assert three_b.run_ram_bytes == pytest.approx((3.0 + 2.2) * GB, rel=0.05)
    assert estimate(params, "int4", 0, 257_216 * 2048, total_ram=8 * GB).prefill_graph_bytes == 0  # over 1/4
    # a 10B / 28B: the peak follows the embedding table, the fp32 vision scratch stays SigLIP's, no prefill
    # graph (over a quarter of 24 GB: export/tune.py), measured in benchmarks/results/big-pg2-10b-224.md
    ten_b = {"text_config": {"vocab_size": 257_216, "hidden_size": 3584}}
    assert embedding_size(ten_b) == 257_216 * 3584 and embedding_size({"text_config": {}}) is None
    big = estimate(9.67e9, "int4", 0, embedding_size(ten_b), total_ram=24 * GB)
    assert big.peak_ram_bytes == pytest.approx(10.4 * GB, rel=0.05) and big.scratch_bytes == pytest.approx(1.66 * GB)
    assert big.prefill_graph_bytes == 0 and big.folder_bytes == pytest.approx(5.35 * GB, rel=0.15)
    assert big.run_ram_bytes == pytest.approx(7.4 * GB, rel=0.05)
    assert estimate(9.67e9, "int8", 0, embedding_size(ten_b), total_ram=24 * GB).run_ram_bytes == pytest.approx(
        12.5 * GB, rel=0.05)
    assert shortfall(big, available_ram=20 * GB, free_disk=100 * GB, total_ram=24 * GB) is None
    whole = estimate(27.65e9, "fp32", 0, 257_216 * 4608, total_ram=24 * GB)
    refused = shortfall(whole, available_ram=64 * GB, free_disk=1000 * GB, total_ram=24 * GB)
    assert refused.startswith("captioning with its fp32 folder needs about 112.1 GB") and "has 24.0 GB" in refused
    whole_int4 = estimate(27.65e9, "int4", 0, 257_216 * 4608, total_ram=24 * GB)
    assert shortfall(whole_int4, available_ram=20 * GB, free_disk=100 * GB, total_ram=24 * GB) is None
    # 896 px: calibration over 4096 image tokens, measured on pg1-3b-896 (benchmarks/results/big-pg1-3b-896.md)
    config = {"torch_dtype": "bfloat16", "text_config": {"vocab_size": 257_216, "hidden_size": 2048,
              "num_attention_heads": 8}, "vision_config": {"image_size": 896, "patch_size": 14}}
    at_896 = checkpoint_estimate({"model.safetensors": int(2.93e9 * 2)}, config, "int4", 0, 24 * GB)
    assert at_896.peak_ram_bytes == pytest.approx(13.6 * GB, rel=0.05) and at_896.seconds == pytest.approx(900, rel=0.1)
    assert at_896.run_ram_bytes == pytest.approx(9.6 * GB, rel=0.1) and at_896.folder_bytes == pytest.approx(
        4.02 * GB, rel=0.1)
    pg2 = {"torch_dtype": "bfloat16", "vision_config": {"image_size": 896, "patch_size": 14},
           "text_config": {"vocab_size": 257_216, "hidden_size": 2304, "model_type": "gemma2", "sliding_window": 4096,
                           "num_attention_heads": 8}}
    pg2_896 = checkpoint_estimate({"model.safetensors": int(3.04e9 * 2)}, pg2, "int4", 0, 24 * GB)
    assert pg2_896.run_ram_bytes == pytest.approx(15.1 * GB, rel=0.1)  # the windowed graph too: big-pg2-3b-896.md
    assert pg2_896.peak_ram_bytes == pytest.approx(13.5 * GB, rel=0.1)
    config["vision_config"] = {"num_image_tokens": 256}
    assert checkpoint_estimate({"model.safetensors": int(2.93e9 * 2)}, config, "int4", 0).peak_ram_bytes < 6.2 * GB
    from palionnx.cli.export_plan import MEASURED
    from palionnx.runtime.levels import QUANT_LEVELS

    assert set(MEASURED) == set(QUANT_LEVELS)  # every level a first-use export can be asked for is planned


# --- help, progress, tables ---

COMMANDS = [["caption"], ["export"], ["synth"], ["info"], ["bench"], ["doctor"], ["models"], ["models", "rm"], []]


@pytest.mark.parametrize(("command", "columns"), [(c, 80) for c in COMMANDS] + [(["caption"], 120)],
                         ids=lambda c: " ".join(map(str, c)) if isinstance(c, list) else str(c))
def test_help_screens_are_clean(command, columns):
    run = console(*command, "--help", env={"COLUMNS": str(columns)})
    assert run.returncode == 0 and run.stderr == ""
    for raw in ("<str>", "<int", "<float", "<list", "<path>", "<bool>", "{INPUT", "{model", "{source}"):
        assert raw not in run.stdout, (raw, run.stdout)
    if command == ["caption"]:
        assert "mnemic/paligemma-longprompt-v1-safetensors" in run.stdout  # the default, in one piece
        for panel in ("Input and output", "Model", "Generation", "Performance", "Ray"):
            assert f"─ {panel}" in run.stdout


def test_no_command_shows_the_overview():
    run = console()
    assert run.returncode == 0 and "caption" in run.stdout and "doctor" in run.stdout


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_rich_bar_on_a_terminal_and_lines_otherwise():
    from palionnx.jobs.progress import Progress

    plain = io.StringIO()
    progress = Progress(2, stream=plain)
    progress.update("a.png", "5 tokens")
    progress.update("b.png", "", error="b.png: not a readable image")
    progress.close()
    assert plain.getvalue().splitlines() == ["[1/2] a.png: 5 tokens", "[2/2] error: b.png: not a readable image"]

    screen = Terminal()
    progress = Progress(2, stream=screen)
    progress.update("a.png", "5 tokens")
    progress.update("b.png", "", error="b.png: not a readable image")
    progress.close()
    text = screen.getvalue()
    assert "captioning" in text and "2/2" in text and "img/s" in text and "error: b.png" in text

    quiet = io.StringIO()
    progress = Progress(2, quiet=True, stream=quiet)
    progress.update("a.png", "5 tokens")
    progress.update("b.png", "", error="b.png: broken")
    assert quiet.getvalue() == "error: b.png: broken\n"


def test_tables_are_drawn_on_a_terminal_and_aligned_text_otherwise():
    from palionnx.cli.tables import print_table

    plain = io.StringIO()
    print_table(["model", "size"], [["a", "1.00 GB"], ["long-name", "12.00 GB"]], stream=plain)
    assert plain.getvalue().splitlines() == ["model          size", "a           1.00 GB", "long-name  12.00 GB"]
    screen = Terminal()
    print_table(["model", "size"], [["a", "1.00 GB"]], stream=screen)
    assert "┃" in screen.getvalue() or "│" in screen.getvalue()


# --- the scripts ---

def test_caption_script_explains_what_to_pass(tmp_path):
    made = not (ROOT / "input").exists()
    try:
        run = subprocess.run(["bash", str(ROOT / "scripts/caption.sh")], capture_output=True, text=True)
        assert run.returncode == 2 and "input/" in run.stderr and (ROOT / "input").is_dir()
        assert "usage: scripts/caption.sh FOLDER" in run.stderr
        missing = subprocess.run(["bash", str(ROOT / "scripts/caption.sh"), str(tmp_path / "nope")],
                                 capture_output=True, text=True)
        assert missing.returncode == 2 and "nope: no such file, folder" in missing.stderr
        assert "setup:" not in missing.stderr  # nothing installed before the mistake is reported
    finally:
        if made and (ROOT / "input").is_dir() and not any((ROOT / "input").iterdir()):
            (ROOT / "input").rmdir()


def test_setup_script_does_nothing_when_up_to_date():
    stamp = ROOT / ".venv" / ".palionnx-setup"
    if not stamp.is_file() or Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("this environment was not made by scripts/setup.sh")
    started = time.perf_counter()
    run = subprocess.run(["bash", str(ROOT / "scripts/setup.sh")], capture_output=True, text=True)
    assert run.returncode == 0 and "up to date" in run.stdout and time.perf_counter() - started < 5
