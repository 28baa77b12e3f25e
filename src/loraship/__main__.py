from loraship.cli import run

run()
