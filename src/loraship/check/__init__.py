"""Is the merged model base + adapter? Weights recomputed bit for bit (:mod:`.verify`), outputs compared
through PEFT unmerged (:mod:`.outputs`), with the distances in :mod:`.metrics`."""
