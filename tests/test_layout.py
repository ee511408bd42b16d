"""The layout rules: stages/ is pure compute, weights are safetensors, nothing reaches a hub."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"ray", "fastapi", "starlette", "boto3", "botocore", "prometheus_client"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_stages_import_no_serving_storage_or_metrics_code():
    files = sorted((ROOT / "stages").glob("*.py"))
    assert len(files) >= 8
    offenders = {f.name: sorted(_imports(f) & FORBIDDEN) for f in files if _imports(f) & FORBIDDEN}
    assert offenders == {}


def test_importing_the_whole_pipeline_loads_none_of_them():
    code = "import sys, stages.pipeline, stages.imagefile; print(sorted(m for m in sys.modules if m.split('.')[0] in %r))"
    out = subprocess.run([sys.executable, "-c", code % FORBIDDEN], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_schemas_import_without_torch():
    code = "import sys, deployments.schemas; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_unpickling_or_hub_calls_in_project_code():
    bad = []
    for path in list((ROOT / "stages").glob("*.py")) + list((ROOT / "deployments").glob("*.py")):
        text = path.read_text()
        # The needles are assembled so that this file itself does not read as a hub call to text scanners.
        for needle in ("pickle" + ".load", "torch" + ".load(", "hf_hub" + "_download", "snapshot" + "_download",
                       "local_files_only=" + "False"):
            if needle in text:
                bad.append(f"{path.name}: {needle}")
    assert bad == []
