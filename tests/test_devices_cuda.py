"""CUDA artifacts carry nvcc-built PTX, and refuse to load on a machine without a GPU."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import tvm
import tvm_ffi

from edgekit import api, runtime
from edgekit.devices import cuda


@pytest.fixture(scope="module")
def cuda_artifact(add_relu_onnx):
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc (the CUDA toolkit) to build PTX")
    return api.compile(add_relu_onnx, "cuda-sm80", add_relu_onnx.with_name("ar-cuda.edgekit"))


def test_cuda_sm80_artifact_contains_ptx(cuda_artifact):
    root, manifest = cuda_artifact.path, cuda_artifact.manifest
    ptx = sorted(n for n in manifest["files"] if n.endswith(".ptx"))
    assert len(ptx) == 1
    text = (root / ptx[0]).read_text()
    assert text.startswith("//") and ".target sm_80" in text and ".entry" in text
    source = (root / ptx[0].replace(".ptx", ".cu")).read_text()
    assert ptx[0] == f"cuda-{hashlib.sha256(source.encode()).hexdigest()[:16]}.ptx"
    assert "__global__" in source
    runtime.read_manifest(root)  # the PTX is covered by the manifest's sha256 digests


def test_loader_callback_returns_the_artifacts_ptx(cuda_artifact):
    root = cuda_artifact.path
    cuda.register_ptx(root, cuda_artifact.manifest)
    name = next(n for n in cuda_artifact.manifest["files"] if n.endswith(".ptx"))
    source = (root / name.replace(".ptx", ".cu")).read_text()
    got = tvm_ffi.get_global_func("tvm_callback_cuda_compile")(source)
    assert bytes(got) == (root / name).read_bytes()


@pytest.mark.skipif(tvm.cuda().exist, reason="this machine has a CUDA GPU")
def test_loading_without_gpu_fails_clearly(cuda_artifact):
    with pytest.raises(runtime.ArtifactError, match="cuda-sm80.*no CUDA GPU"):
        runtime.load(cuda_artifact.path)
