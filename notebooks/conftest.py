"""pytest --nbval: every notebook writes its runs to one fresh temporary folder (TCMLAB_NB_OUT), shared by 01 → 02 → 03,
removed when the session ends (a TCMLAB_NB_OUT set by the caller is the caller's, and kept)."""

import os
import shutil
import tempfile

OWN = None if "TCMLAB_NB_OUT" in os.environ else tempfile.mkdtemp(prefix="tcmlab-nbval-")
if OWN is not None:
    os.environ["TCMLAB_NB_OUT"] = OWN


def pytest_unconfigure(config):
    if OWN is not None:
        shutil.rmtree(OWN, ignore_errors=True)
