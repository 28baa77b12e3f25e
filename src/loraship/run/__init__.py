"""One job from trigger to published commit: the job (:mod:`.job`), the run (:mod:`.pipeline`) and
its stages: the output's preflight and cleanup (:mod:`.output`), resolve (:mod:`.resolve`), fetch
(:mod:`.fetch`, with the disk and memory preflight of :mod:`.preflight`), merge (:mod:`.merge`,
Hub-to-Hub streaming in :mod:`.streaming`), check (:mod:`.verify`), card (:mod:`.model_card`, the card
itself :mod:`.card`), result (:mod:`.result`) and publish (:mod:`.publish`); what every stage is
handed is :mod:`.context`."""
