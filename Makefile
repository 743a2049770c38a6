# The two commands of the README's Quick start, and a few helpers.
.PHONY: run test lint lock

# What installs .venv; BOOTSTRAP=: skips it (the tests run make run on an installed .venv).
BOOTSTRAP = scripts/bootstrap

# Bring up the console (embedded SQLite + local Redis) with a worker, until Ctrl-C.
run:
	@$(BOOTSTRAP) runtime
	@.venv/bin/python manage.py berth_up

# Run the whole test suite (extra pytest arguments: make test ARGS="-k audit").
test:
	@scripts/bootstrap dev
	@.venv/bin/python -m pytest $(ARGS)

lint:
	@scripts/bootstrap dev
	@.venv/bin/ruff check .
	@.venv/bin/ruff format --check .
	@.venv/bin/lint-imports

# Re-pin the lock files after changing pyproject.toml.
lock:
	@scripts/bootstrap dev
	.venv/bin/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe -o requirements.lock pyproject.toml
	.venv/bin/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe --extra dev -c requirements.lock -o requirements-dev.lock pyproject.toml
