# The same commands for people, CI and the README (they all call scripts/dev.sh).
.PHONY: run test lint services setup
run:
	@./scripts/dev.sh run
test:
	@./scripts/dev.sh test
lint:
	@./scripts/dev.sh lint
services:
	@./scripts/dev.sh services
setup:
	@./scripts/dev.sh setup
