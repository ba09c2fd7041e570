"""Planning: where a model's layers go on the GPUs, or why they do not fit and what would. The model
file's header (gguf.py, its values checked by keys.py), its settings and `args` (runtime.py, reading them
through launcher/server_args.py), the bytes per term (estimate.py, compute.py, arch.py's rules per
architecture), the GPUs chosen and the split (layout.py, over each GPU's usable memory), the plan of one
model with its reasons and suggestions (model_plan.py), the largest context that fits for `ctx: max`
(context.py), the plan of an rpc-server lending this host's
GPUs (rpc_server.py), planning over peers' lent GPUs and what a split across hosts sends over the network
(remote.py), the output a server is started with (placement.py's `Placement`), and the seam the daemon
and the CLI call (planner.py's `Planner`).

Pure of servers: the model file comes in from the caller (its backend found it) and the placement goes
out to the backend, which makes the command line and the child's environment of it; nothing here asks a
backend anything or runs a process."""
