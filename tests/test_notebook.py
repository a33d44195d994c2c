"""notebooks/quickstart.ipynb runs end to end (on a tiny model), so it cannot rot."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    for key, value in {"SPINQUANT_MODEL": str(tiny_model_dir), "SPINQUANT_DATA": str(corpus_file),
                       "SPINQUANT_EVAL_DATA": str(corpus_file), "SPINQUANT_OUT": str(tmp_path / "run"),
                       "SPINQUANT_STEPS": "3", "SPINQUANT_SEQLEN": "64", "SPINQUANT_GPTQ_NSAMPLES": "4"}.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "float ppl" in outputs and "KL" in outputs
    assert (tmp_path / "run" / "model.pte").is_file() and (tmp_path / "run" / "report.md").is_file()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # learning curve and residual-stream outliers
    api_run = tmp_path / "run-api"  # spinquant.quantize in memory, then spinquant.export
    assert (api_run / "consolidated.00.pth").is_file() and (api_run / "quantized.safetensors").is_file()
    assert "W4g32A8KV16 8da4w_output_8da8w" in outputs
