"""The default launch configs fit on chip: compiled offline for sm_90 (H100/H200) with Triton's
bundled ptxas, no variant spills registers and every one multiplies on the tensor cores."""
import json
import os
import subprocess
import sys

import pytest

from tritonrnn.perf import static

MAX_STACK_BYTES = 32  # a few spilled registers (3xTF32 at H=128 spills 24 bytes), not a spill loop


@pytest.mark.skipif(not static.available(), reason="this triton has no bundled NVIDIA toolchain")
def test_default_configs_compile_for_hopper_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tritonrnn.perf.static"], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    variants = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(variants) == len(static.default_variants())
    table = "\n".join(f"{v['path']:8s} {v['dtype']:8s} tf32={v['allow_tf32']:5s} H={v['hidden']:4s} "
                      f"bw={v.get('backward', 'False'):5s} regs={v['registers']} stack={v['stack_bytes']} "
                      f"{v['mma'][:1]}" for v in variants)
    assert all(v["stack_bytes"] <= MAX_STACK_BYTES for v in variants), "spills:\n" + table
    assert all(v["mma"] for v in variants), "FMA-only matmuls:\n" + table
    persistent = [v for v in variants if v["path"] == "persistent"]
    assert persistent and all(v["stack_bytes"] == 0 for v in persistent), "persistent spills:\n" + table
    # Every standard-grid cell on the persistent path fits: H100 SXM and H200 both have 132 SMs of
    # sm_90 (65536 registers, 228 KB shared memory, 2048 threads each): SMLimits' defaults.
    rows = static.persistent_fit(variants)
    assert len(rows) == 3 * 4 * 4, static.fit_table(rows)  # 3 dtypes x H 256..2048 x 4 batches
    for row in rows:
        programs = row["plan"]["programs_per_group"] * row["plan"]["groups"]
        assert 1 <= row["programs_per_sm"] and programs <= row["capacity"], static.fit_table(rows)
