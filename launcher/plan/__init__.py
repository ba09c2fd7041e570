"""Planning: from a model's GGUF header (gguf.py, its values checked by keys.py), its settings and `args`
(args.py, runtime.py) and the GPUs' readings, the bytes per term (estimate.py, compute.py, arch.py's rules
per architecture), the GPUs chosen and the split (place.py), the plan with its reasons and suggestions
(planner.py), behind one seam (placer.py's Planner). Nothing here runs a process."""
