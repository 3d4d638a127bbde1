"""How much work this machine's two cores do together, against one alone (issue #5, scaling).

    .venv/bin/python benchmarks/cores.py [--rounds 8] [--loops 6000000]

The two-process target compares two daphnes on two cores with one on one core.
On a virtual machine two vCPUs need not be two cores' worth of work: they may be
hyperthreads of one physical core, or share it with other guests. This measures
that with the simplest CPU-bound Python there is (a loop, no memory traffic to
speak of, no shared state): the same loop pinned to core 0 alone, then on both
cores at once, each round in turn so drifts in the machine's speed hit both.
`factor` is the pair's rate over one core's: 2.0 when the cores are independent,
1.0 when two cores together do no more than one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# Pins itself, waits for the go (a line on stdin) so both copies start together,
# then prints the loop's wall and CPU seconds.
SPIN = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
n = int(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
w, c = time.perf_counter(), time.process_time()
x = 0
for i in range(n):
    x += i * i
print(time.perf_counter() - w, time.process_time() - c, flush=True)
"""


def _steal_ticks() -> int:
    """Ticks the hypervisor ran something else on this machine's vCPUs (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) if len(fields) > 8 else 0


def _spin(cpus: list[int], loops: int) -> list[tuple[float, float]]:
    """Run the loop once on each of `cpus` at the same moment: (wall s, CPU s) each."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SPIN, str(cpu), str(loops)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for cpu in cpus
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in procs:
        wall, cpu = p.stdout.readline().split()
        p.wait()
        out.append((float(wall), float(cpu)))
    return out


def measure(rounds: int = 8, loops: int = 6_000_000) -> dict:
    """Medians over `rounds` alone/together pairs; the factor from wall-clock rates.

    The pair's rate is the sum of each core's (loops / its wall time), so a core that
    finishes early is not charged for the other one's wait.
    """
    if len(os.sched_getaffinity(0)) < 2:
        return {"error": "fewer than two cores available"}
    alone, core0, core1, steal = [], [], [], {"alone": 0, "together": 0}
    for _ in range(rounds):
        s = _steal_ticks()
        alone.append(_spin([0], loops)[0][0])
        steal["alone"] += _steal_ticks() - s
        s = _steal_ticks()
        (w0, _), (w1, _) = _spin([0, 1], loops)
        steal["together"] += _steal_ticks() - s
        core0.append(w0)
        core1.append(w1)
    a, t0, t1 = (statistics.median(x) for x in (alone, core0, core1))
    return {
        "rounds": rounds,
        "loops": loops,
        "alone_s_median": round(a, 3),
        "together_s_median": [round(t0, 3), round(t1, 3)],
        "alone_s_range": [round(min(alone), 3), round(max(alone), 3)],
        "together_s_range": [round(min(core0 + core1), 3), round(max(core0 + core1), 3)],
        "steal_ticks": steal,
        "factor": round(a / t0 + a / t1, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--loops", type=int, default=6_000_000)
    a = p.parse_args()
    print(json.dumps(measure(a.rounds, a.loops), indent=2))


if __name__ == "__main__":
    main()
