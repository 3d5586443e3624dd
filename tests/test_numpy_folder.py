"""Model folders written from numpy weights without torch (palionnx.export.numpy_folder): the unit tier's models."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from palionnx.export.numpy_folder import write_folder
from palionnx.runtime.captioner import Captioner
from palionnx.runtime.manifest import Manifest


def test_writing_a_folder_needs_no_torch(tmp_path):
    code = ("import sys; from palionnx.export.numpy_folder import write_folder; "
            f"write_folder('tiny-pg2', {str(tmp_path / 'm')!r}); print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
    assert Manifest.load(tmp_path / "m").family == "pg2"


@pytest.mark.parametrize("level", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("family", ["tiny-pg1", "tiny-pg2"])
def test_a_numpy_folder_captions_the_same_alone_and_in_a_batch(numpy_folder, family, level):
    captioner = Captioner.load(numpy_folder(family, level), device="cpu")  # loading checks graphs against manifest
    images = [Image.new("RGB", (40, 40), colour) for colour in ("red", "blue", "green")]
    together = captioner.caption(images, max_new_tokens=16, batch_size=3)
    alone = [captioner.caption([image], max_new_tokens=16, batch_size=1)[0] for image in images]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert all(len(r.tokens) == 16 and r.ok for r in together)  # random weights rarely stop early
    assert len({tuple(r.tokens) for r in together}) == 3  # the image matters


def test_the_seed_chooses_the_weights(tmp_path):
    first, again, other = (write_folder("tiny-pg1", tmp_path / name, seed=seed)
                           for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    data = [np.fromfile(folder / "decoder.onnx.data", dtype=np.uint8) for folder in (first, again, other)]
    assert np.array_equal(data[0], data[1]) and not np.array_equal(data[0], data[2])


def test_levels_are_recorded_and_quantize_every_weighted_matmul(numpy_folder, tmp_path):
    import onnx

    for level, bits in (("int8", 8), ("int4", 4)):
        folder = numpy_folder("tiny-pg1", level)
        assert Manifest.load(folder).quant.level == level and Manifest.load(folder).quant.bits == bits
        for graph in ("vision_encoder.onnx", "decoder.onnx"):
            nodes = onnx.load(str(folder / graph), load_external_data=False).graph.node
            ops = {n.op_type for n in nodes}
            assert "MatMulNBits" in ops and "Gemm" not in ops, (level, graph, ops)
    with pytest.raises(ValueError, match="numpy folders are fp32, int8, int4"):
        write_folder("tiny-pg1", tmp_path / "x", level="fp16")
