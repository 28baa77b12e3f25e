"""The GitHub Action's entry point: ``python -m entrypoint`` (the Docker image's ENTRYPOINT runs the same).

Thin on purpose: it turns the runner's environment into a MergeJob, runs loraship's pipeline, and
turns the result into outputs, a step summary, workflow commands and GitHub statuses/releases.
"""
