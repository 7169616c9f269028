# cellmesh: the two commands a newcomer needs, and a few more.
.PHONY: demo up down test setup check bench clean

# Install everything (CellProfiler included) and run a whole plate through the mesh.
demo: setup
	.venv/bin/python -m services.mesh demo $(ARGS)

# The local mesh for your own plates, kept running until `make down` (README, "Your own plates").
up: setup
	.venv/bin/python -m services.mesh up $(ARGS)

down:
	.venv/bin/python -m services.mesh down $(ARGS)

# Everything CI runs: static checks and the test suite against the real servers.
test: setup
	bash scripts/test.sh

setup:
	bash scripts/setup.sh

check:
	bash scripts/check.sh

bench: setup
	bash bench/run_all.sh

clean:
	rm -rf var .venv node_modules
