"""``deploykit serve``: one matrix cell as local processes (Mosquitto, vLLM, the bridge), for GPU
servers without Docker.

- ``record``: what a running serve instance writes into its ``stack.json`` (engine URL, broker,
  secrets, logs, process ids), so health, chat and credentials (and a benchmark) find it;
- ``plan``: the request resolved once, through the same gate as ``up``, into the processes' commands
  and environments (pure but for the checkpoint and GPU reads the gate does);
- ``host``: the edge: ports, the broker's files, the vLLM version, starting and stopping;
- ``processes``: a supervisor of child process groups.
"""
