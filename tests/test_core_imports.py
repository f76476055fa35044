"""The core plans and validates with torch and jax unavailable, and never imports them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: an import hook makes the frameworks unimportable, as on a machine
# where only the core is installed, then the CLI plans every shipped spec.
SCRIPT = r"""
import sys
BLOCKED = ("torch", "jax", "jaxlib", "flax", "transformers", "tokenizers", "matplotlib")

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
from typer.testing import CliRunner
from kdspec.cli import app

runner = CliRunner()
specs = sys.argv[1:]
for command in (["validate", *specs], *(["plan", s] for s in specs),
                *(["plan", s, "--json"] for s in specs), ["schema"]):
    result = runner.invoke(app, command)
    assert result.exit_code == 0, (command, result.output)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("ok")
"""


def test_plan_and_validate_without_frameworks():
    specs = [str(p) for p in sorted((ROOT / "specs").rglob("*.yaml"))]
    result = subprocess.run([sys.executable, "-c", SCRIPT, *specs], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
