# Thin calls of the deploykit CLI. `make help` lists the targets.
#   make up                      the stack on this machine's defaults (cpu + demo model without a GPU)
#   make up QUANT=fp8 GPU=2      fp8 on GPU 2 (GPU takes an index, a list like 0,1, or UUIDs)
#   make test                    every test, against real Docker, Mosquitto and vLLM (CPU build)
QUANT ?=
GPU ?=
MODEL ?=
PROJECTS ?=
DK := .venv/bin/deploykit
comma := ,
PROJECT := $(or $(firstword $(subst $(comma), ,$(PROJECTS))),general)
UP_ARGS := $(if $(QUANT),--quant $(QUANT)) $(if $(GPU),--gpus $(GPU)) $(if $(MODEL),--model $(MODEL)) $(if $(PROJECTS),--projects $(PROJECTS))

.DEFAULT_GOAL := help
.PHONY: help setup up down health logs ps chat build render check test lint

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: ## install what this machine lacks (Docker, compose, .venv)
	bash scripts/provision.sh

up: setup ## build the images if needed, start the stack, wait until healthy, ask it one question
	$(DK) up $(UP_ARGS) --wait
	$(DK) chat --project $(PROJECT) --message "Hello! Who are you?"

down: ## stop the stack and remove its containers, networks and volumes
	$(DK) down

health: ## layered health checks of the running stack
	$(DK) health

logs: ## follow the stack's logs
	$(DK) logs --follow

ps: ## list the stack's containers
	$(DK) ps

chat: ## talk to the stack over MQTT (PROJECTS picks the project)
	$(DK) chat --project $(PROJECT)

build: setup ## build the engine, bridge and broker images
	$(DK) build $(if $(QUANT),--quant $(QUANT))

render: ## render images/ and compose/ from the templates
	$(DK) render

check: ## fail when images/ or compose/ are not what the templates produce
	$(DK) render --check

test: ## run every test (provisions Mosquitto, debootstrap and the vLLM CPU build first)
	bash scripts/provision.sh --tests
	.venv/bin/pytest

lint: ## ruff (lint + format) and mypy
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
