"""pytest --nbval: every notebook writes its runs to one fresh temporary folder (TCMLAB_NB_OUT), shared by 01 → 02 → 03."""

import os
import tempfile

os.environ.setdefault("TCMLAB_NB_OUT", tempfile.mkdtemp(prefix="tcmlab-nbval-"))
