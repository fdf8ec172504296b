"""Everything is declared in pyproject.toml; this file only adds numgguf-trace.pth.

The .pth file makes ``import trace`` resolve to our package from any working directory
(see _numgguf_trace.py). pyproject.toml cannot declare a file at the root of
site-packages, so build_py writes it: into the build folder for a wheel, and straight
into the editable wheel for ``pip install -e .`` (setuptools' editable builds write
non-package files to the wheel's install_lib; files left in build_lib are dropped).
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "numgguf-trace.pth"
# .pth files run lines that start with "import"; sorted after setuptools' own
# __editable__*.pth, so in an editable install _numgguf_trace is importable by then
PTH_LINE = "import _numgguf_trace; _numgguf_trace.install()\n"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            dest = self.get_finalized_command("install").install_lib
        else:
            dest = self.build_lib
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, PTH_NAME), "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs


setup(cmdclass={"build_py": build_py_with_pth})
