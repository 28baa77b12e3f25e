"""One job from trigger to published commit: the job (:mod:`.job`), the preflight, the stages of a run
(:mod:`.pipeline`), Hub-to-Hub streaming (:mod:`.streaming`) and the model card (:mod:`.card`)."""
