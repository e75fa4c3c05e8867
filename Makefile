# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15

.PHONY: install run test lint bench-worklist bench-routing bench-ui clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py ensure_superuser
	exec $(BIN)/python manage.py rungateway

test: install
	scripts/ensure-test-services.sh
	$(BIN)/ruff check .
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) TCP_NODELAY=1 \
	  $(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	# What `make run` uses instead of PostgreSQL has paths of its own: claims and storing.
	DATABASE_URL=sqlite:///$(CURDIR)/.venv/embedded-test.sqlite3 REDIS_URL=$(TEST_REDIS_URL) \
	  TCP_NODELAY=1 $(BIN)/pytest -q -p no:cacheprovider \
	  tests/routing/test_delivery_rows.py tests/routing/test_storage.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-worklist: install
	scripts/ensure-test-services.sh
	DATABASE_URL=$(TEST_DATABASE_URL) TCP_NODELAY=1 $(BIN)/python bench/worklist.py

bench-routing: install
	scripts/ensure-test-services.sh
	DATABASE_URL=$(TEST_DATABASE_URL) TCP_NODELAY=1 $(BIN)/python bench/routing.py

# Its own database (bench_ui on the same server), seeded once and kept for the next run.
bench-ui: install
	scripts/ensure-test-services.sh
	DATABASE_URL=$(TEST_DATABASE_URL) TCP_NODELAY=1 $(BIN)/python bench/ui.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var
