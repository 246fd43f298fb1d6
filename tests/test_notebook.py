"""notebooks/quickstart.ipynb runs top to bottom without errors and shows images.

The notebook is executed with nbclient in a kernel started from this interpreter (sys.executable), through a
kernelspec written to a temporary folder: a fresh venv with the [test] extra needs no `ipykernel install`, and
a `python3` kernelspec of another Python on the machine cannot be picked up by mistake.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (installed with nbclient)
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def this_python_kernel(tmp_path: Path) -> KernelManager:
    spec_dir = tmp_path / "kernels" / "this-python"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "this python", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="this-python", kernel_spec_manager=specs)


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert all(not c.outputs and c.execution_count is None for c in code), "save the notebook without outputs"


def test_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, km=this_python_kernel(tmp_path), timeout=600,
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "seed 7 twice, identical: True" in text
    assert "seed 7 vs seed 8, identical: False" in text
    assert "torch.Size([1, 4, 16, 16])" in text  # latents (1, 4, 64/4, 64/4) of the emoji model
    assert "final.safetensors" in text  # the training run exported its weights

    # every cell with a top-level show(...) displays its grid as a PNG: text to image, seeds, latents, img2img,
    # inpaint, the shapes model and the trained model
    shows = [c for c in nb.cells if c.cell_type == "code" and re.search(r"^show\(", c.source, re.M)]
    assert len(shows) == 7
    for c in shows:
        assert any("image/png" in o.get("data", {}) for o in c.outputs), c.source
