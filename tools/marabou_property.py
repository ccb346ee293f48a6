"""Marabou's time to the verdict on one ε-box robustness property (issue 15's benchmark).

The property is VNN-COMP verivital's shape: every input within ε (L∞) of a centre image,
clipped to [0, 1], keeps the class the model gives the centre. The centre is a seeded
uniform image (no MNIST image is at hand here). One Marabou query per other class ``j``
asks for ``y_j >= y_c``; the verdict is ``sat`` (a counterexample) at the first sat query,
``unsat`` (robust) when all are unsat, ``timeout`` when the time budget runs out.

    python tools/marabou_property.py MODEL.onnx --eps 0.004 [--timeout 600] [--seed 0]
        [--tightening deeppoly|sbt|none]

Prints one JSON line: verdict, seconds, read seconds, peak memory (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--eps", type=float, required=True)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tightening", default="deeppoly", help="Marabou's tighteningStrategy")
    args = ap.parse_args()
    from maraboupy import Marabou

    start = time.perf_counter()
    net = Marabou.read_onnx(args.model)
    read_s = time.perf_counter() - start
    inputs = np.array(net.inputVars[0]).reshape(-1)
    outputs = np.array(net.outputVars[0]).reshape(-1)
    centre = np.random.default_rng(args.seed).uniform(0, 1, inputs.size)
    y = np.array(net.evaluateWithoutMarabou([centre.reshape(net.inputVars[0].shape)])[0])
    label = int(np.argmax(y.reshape(-1)))
    lo, hi = np.clip(centre - args.eps, 0, 1), np.clip(centre + args.eps, 0, 1)
    for v, a, b in zip(inputs, lo, hi, strict=True):
        net.setLowerBound(int(v), float(a))
        net.setUpperBound(int(v), float(b))
    verdict = "unsat"
    begin = time.perf_counter()
    for j in range(outputs.size):
        if j == label:
            continue
        left = args.timeout - (time.perf_counter() - begin)
        if left <= 0:
            verdict = "timeout"
            break
        before = len(net.equList)
        net.addInequality([int(outputs[label]), int(outputs[j])], [1.0, -1.0], 0.0)  # y_j >= y_c
        opts = Marabou.createOptions(timeoutInSeconds=max(1, int(left)), verbosity=0,
                                     tighteningStrategy=args.tightening)
        result, _, _ = net.solve(options=opts, verbose=False)
        del net.equList[before:]
        if result == "sat":
            verdict = "sat"
            break
        if result != "unsat":
            verdict = "timeout" if result in ("TIMEOUT", "timeout") else result
            break
    print(json.dumps({
        "model": args.model, "eps": args.eps, "tightening": args.tightening, "label": label,
        "verdict": verdict,
        "solve_s": round(time.perf_counter() - begin, 2), "read_s": round(read_s, 2),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }))


if __name__ == "__main__":
    main()
