"""The one compiled part: the resampler's FIR kernel (ivr_bridge/audio/_fir.c).

Optional: where no C compiler is found the install goes on, and the resampler computes the
same sums with numpy (slower per 20 ms frame; BENCHMARKS.md, issue 14).
"""

import sysconfig

from setuptools import Extension, setup

# A Unix build names its C compiler (GCC or Clang in practice; MSVC builds name none): let
# the FIR's dot products use vector lanes, which reorders their sums (no NaN or infinity can
# occur: the inputs are audio samples).
unix_cc = sysconfig.get_config_var("CC") is not None
flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros"]

setup(
    ext_modules=[
        Extension(
            "ivr_bridge.audio._fir",
            ["ivr_bridge/audio/_fir.c"],
            extra_compile_args=flags if unix_cc else [],
            optional=True,
        )
    ]
)
