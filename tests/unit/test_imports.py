import subprocess
import sys


def test_importing_the_core_does_not_import_ray():
    code = (
        "import sys, imgcls_core, imgcls_core.config, imgcls_core.data, imgcls_core.models, "
        "imgcls_core.engine, imgcls_core.evaluation, imgcls_core.runner, imgcls_core.data.presets, "
        "imgcls_core.predict, imgcls_core.tracking, imgcls_core.packaging, imgcls_core.engine.session, "
        "imgcls_core.data.loaders, imgcls_core.data.preprocessing\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
