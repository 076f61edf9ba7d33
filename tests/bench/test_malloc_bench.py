"""bench/malloc.py runs one short round so that it cannot rot; its images/s are not asserted as speed,
only its page faults, which do not depend on the machine's load."""

import pytest

from capsnet.model_export import malloc
from tests.tools import skip_unless_ci


@pytest.mark.slow
def test_one_round_measures_both_allocators_and_tcmalloc_spares_the_page_faults(capsys):
    if malloc.tcmalloc() is None:
        skip_unless_ci("no tcmalloc library (Debian: libtcmalloc-minimal4)")
    from bench.malloc import main

    r = main(["--rounds", "1", "--steps", "1"])
    (only,) = r["rounds"]
    glibc, tc = only["glibc"], only["tcmalloc"]
    assert glibc["allocator"] == "glibc" and tc["allocator"] == "tcmalloc"
    assert glibc["images_per_s"] > 0 and only["ratio"] == tc["images_per_s"] / glibc["images_per_s"]
    # B = 128: the routing's 47 MB tensors, fresh pages at every step under glibc (measured 270,000-300,000
    # faults a step against 2,400 under tcmalloc)
    assert tc["minor_faults_per_step"] < glibc["minor_faults_per_step"] / 10
    assert "median" in capsys.readouterr().out
