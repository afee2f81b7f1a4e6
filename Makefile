# Thin calls of the deploykit CLI. `make help` lists the targets.
#   make up                      the stack on this machine's defaults (cpu + demo model without a GPU)
#   make up QUANT=fp8 GPU=2      fp8 on GPU 2 (GPU takes an index, a list like 0,1, or UUIDs)
#   make test                    every test, against real Docker, Mosquitto and vLLM (CPU build)
# Variables (each becomes the flag beside it; ARGS passes any other flags as they are):
#   QUANT (--quant)  GPU (--gpus)  GPU_CLASS (--gpu-class)  MODEL (--model)  PROJECTS (--projects)
#   PROJECT (--project: chat, credentials; default: the first of PROJECTS)  NAME (--name)
#   MQTT_PORT (--mqtt-port)  ARGS (e.g. ARGS="--force" or ARGS="--max-model-len 8k")
QUANT ?=
GPU ?=
GPU_CLASS ?=
MODEL ?=
PROJECTS ?=
NAME ?=
MQTT_PORT ?=
ARGS ?=
DURATION ?= 600
SOAK_NAME ?= soak
SOAK_PORT ?= 18883
DK := .venv/bin/deploykit
comma := ,
PROJECT ?= $(or $(firstword $(subst $(comma), ,$(PROJECTS))),general)
WHERE := $(if $(NAME),--name $(NAME))
UP_ARGS := $(if $(QUANT),--quant $(QUANT)) $(if $(GPU),--gpus $(GPU)) \
  $(if $(GPU_CLASS),--gpu-class $(GPU_CLASS)) $(if $(MODEL),--model $(MODEL)) \
  $(if $(PROJECTS),--projects $(PROJECTS)) $(if $(MQTT_PORT),--mqtt-port $(MQTT_PORT)) $(WHERE)

.DEFAULT_GOAL := help
.PHONY: help setup up down health logs ps ls chat credentials top bench build render check test lint soak

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@sed -n 's/^# \{1,3\}\([A-Z].*(--.*\)/  \1/p' $(MAKEFILE_LIST)

setup: ## install what this machine lacks (Docker, compose, .venv)
	bash scripts/provision.sh

up: setup ## build the images if needed, start the stack, wait until healthy, ask it one question
	$(DK) up $(UP_ARGS) --wait $(ARGS)
	$(DK) chat --project $(PROJECT) $(WHERE) --message "Hello! Who are you?"

down: ## stop the stack and remove its containers, networks and volumes
	$(DK) down $(WHERE) $(ARGS)

health: ## layered health checks of the running stack
	$(DK) health $(WHERE) $(ARGS)

logs: ## follow the stack's logs
	$(DK) logs --follow $(WHERE) $(ARGS)

ps: ## list the stack's containers
	$(DK) ps $(WHERE) $(ARGS)

ls: ## list the deploykit stacks on this host
	$(DK) ls $(ARGS)

chat: ## talk to the stack over MQTT (PROJECT picks the project)
	$(DK) chat --project $(PROJECT) $(WHERE) $(ARGS)

credentials: ## broker address, username, password file and client snippets (PROJECT)
	$(DK) credentials --project $(PROJECT) $(WHERE) $(ARGS)

top: ## live view: requests/s, tokens/s, latency per project; the engine's queue and KV cache
	$(DK) top $(WHERE) $(ARGS)

bench: ## measure the running stack through MQTT and directly (project bench; ARGS="--concurrency 1,8")
	$(DK) bench $(WHERE) $(ARGS)

build: setup ## build the engine, bridge and broker images
	$(DK) build $(if $(QUANT),--quant $(QUANT)) $(if $(GPU_CLASS),--gpu-class $(GPU_CLASS)) $(ARGS)

render: ## render images/ and compose/ from the templates
	$(DK) render

check: ## fail when images/ or compose/ are not what the templates produce
	$(DK) render --check

test: ## run every test (provisions Mosquitto, debootstrap, the vLLM CPU build, Node's mqtt.js first)
	bash scripts/provision.sh --tests
	.venv/bin/pytest

soak: setup ## faults under load on a cpu stack of its own for DURATION s (root); fails if a request was lost
	$(DK) up --name $(SOAK_NAME) --projects soak --mqtt-port $(SOAK_PORT) --bridge-config benchmarks/soak-bridge.yaml --wait
	$(DK) soak --name $(SOAK_NAME) --duration $(DURATION) --json benchmarks/results/soak.json; status=$$?; $(DK) down --name $(SOAK_NAME); exit $$status

lint: ## ruff (lint + format) and mypy
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
