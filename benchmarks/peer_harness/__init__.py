"""The parts of the peer harness (benchmarks/peers.py runs them): the workloads and the prior written peer-side
(``workloads``), the contenders (``contenders``), the float64 gradient match (``gradients``), the interleaved timing
(``timing``) and the RESULTS.md section (``report``)."""
