"""The model-folder contract: every exported graph has the names the contract gives, and the manifest is
typed and checked on load."""

import json
import shutil

import onnx
import pytest

from palionnx.runtime import contract
from palionnx.runtime.manifest import Manifest, ModelFolderError, QuantInfo
from palionnx.runtime.text import TextCodec


@pytest.mark.parametrize("family", ["tiny-pg1", "tiny-pg2"])
@pytest.mark.parametrize("quant", ["fp32", "fp16", "bf16", "int8", "int4"])
def test_exported_graphs_follow_the_contract(family, quant, exported):
    _check_contract(exported(family, quant), family, quant)


@pytest.mark.parametrize("family", ["tiny-pg1", "tiny-pg2"])
@pytest.mark.parametrize("level", ["fp32", "int8", "int4"])
def test_numpy_folders_follow_the_contract(family, level, numpy_folder):
    """The unit tier's folders are model folders as exports are."""
    _check_contract(numpy_folder(family, level), family, level)


def _check_contract(folder, family, quant):
    manifest = Manifest.load(folder)
    windowed = {contract.DECODER_WINDOWED} if family == "tiny-pg2" else set()
    assert set(manifest.graphs) == set(contract.REQUIRED_GRAPHS) | windowed
    for role in manifest.graphs:
        graph_path, data_path = contract.graph_files(folder, role)
        assert graph_path.name == contract.GRAPH_FILES[role] == manifest.graphs[role].file and data_path.is_file()
        graph = onnx.load(str(graph_path), load_external_data=False).graph
        expected = contract.graph_io(role, manifest.layers)
        assert [i.name for i in graph.input] == expected.inputs == manifest.graphs[role].inputs
        assert [o.name for o in graph.output] == expected.outputs == manifest.graphs[role].outputs
    assert isinstance(manifest.quant, QuantInfo) and manifest.quant.level == quant
    assert manifest.schema_version == contract.SCHEMA_VERSION


class Raw(str):
    """A change that replaces the whole file with this text."""


def _broken_copy(tmp_path, numpy_folder, change):
    folder = tmp_path / "model"
    shutil.copytree(numpy_folder("tiny-pg1"), folder)
    path = folder / contract.MANIFEST_NAME
    data = json.loads(path.read_text())
    text = change(data)
    path.write_text(text if isinstance(text, Raw) else json.dumps(data))
    return folder


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(schema_version=contract.SCHEMA_VERSION + 1), "upgrade palionnx"),
    (lambda d: d.update(schema_version=2), "export the model again"),
    (lambda d: d.pop("layers"), "field 'layers' is missing"),
    (lambda d: d.update(colour="blue"), "unknown field 'colour'"),
    (lambda d: d.update(layers="two"), "layers must be int"),
    (lambda d: d.update(kv_dtype="int3"), "kv_dtype 'int3'"),
    (lambda d: d["quant"].update(level="int2"), "quant.level 'int2'"),
    (lambda d: d["quant"].update(bits="8"), "quant: bits must be int"),
    (lambda d: d["graphs"].pop("decoder"), "graphs lacks decoder"),
    (lambda d: d["graphs"]["decoder"].pop("file"), "field 'file' is missing"),
    (lambda d: Raw("{not json"), "not valid JSON"),
    (lambda d: Raw("[1, 2]"), "must hold a JSON object"),
])
def test_manifest_errors_name_the_problem(tmp_path, numpy_folder, change, message):
    folder = _broken_copy(tmp_path, numpy_folder, change)
    with pytest.raises(ModelFolderError, match=message.replace("(", r"\(")):
        Manifest.load(folder)


def test_manifest_round_trips(tmp_path, exported):
    folder = exported("tiny-pg2", "int4")
    manifest = Manifest.load(folder)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    manifest.save(copy)
    assert Manifest.load(copy) == manifest


def test_prompt_template_is_applied_as_written(numpy_folder):
    folder = numpy_folder("tiny-pg1")
    manifest = Manifest.load(folder)
    codec = TextCodec(folder, manifest)
    text_ids = codec.tokenizer.encode("caption en\n", add_special_tokens=False).ids
    image = [manifest.image_token_id] * manifest.image_seq_length
    assert codec.prompt_ids("caption en") == image + [manifest.bos_token_id] + text_ids

    manifest.prompt_template = "{bos}{prompt}\n{image}"
    moved = TextCodec(folder, manifest).prompt_ids("caption en")
    assert moved == [manifest.bos_token_id] + text_ids + image
