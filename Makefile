# The two set-up-and-run commands of the README. Both create .venv (tools/setup_venv.sh, idempotent).
.PHONY: demo test setup
PY := .venv/bin/python

setup:
	@bash tools/setup_venv.sh

demo: setup
	$(PY) -m openrlhf_sepo.cli.demo --output_dir demo_output

test: setup
	$(PY) -m pytest -q tests
