# Set-up and entry points for a fresh machine. Every target creates the virtual environment first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch and torchvision are installed first, as a matching pair. Override for another platform,
# e.g. make TORCH_SPEC="torch torchvision" test
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DATA ?= ../shared/data/wds
TEACHER_DIR ?= runs/teacher
RUN_DIR ?= runs/align-imagenette
# Samples in the align epoch of `make align`: 1024 of the 4,000 Imagenette training images keeps the
# run short on a CPU. Raise it, or drop --train-num-samples, for a full epoch.
ALIGN_SAMPLES ?= 1024
# `make results`: a trained student checkpoint to score. When empty, benchmarks/results.py trains a short align
# run and the page states it. RESULTS_ARGS passes further flags, e.g. RESULTS_ARGS="--num-images 1000".
STUDENT ?=
RESULTS_ARGS ?=
# `make demo`: further flags for python -m open_clip_spiking.demo, e.g. DEMO_ARGS="--finetune-samples 60000".
DEMO_ARGS ?=
# Where the Debian package dataset-fashion-mnist installs Fashion-MNIST, and where the demo looks first.
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
# The demo's cache folder, as python -m open_clip_spiking.demo finds it without --cache-dir.
DEMO_CACHE := $(or $(OPEN_CLIP_SPIKING_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/open_clip_spiking)
# apt-get runs through sudo for a user other than root, when sudo exists.
SUDO := $(shell [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && echo sudo)

.PHONY: install test align teacher results speed fashion-mnist demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[test,offline-teacher]"
	touch $@

test: install
	$(PY) -m pytest

teacher: install
	$(PY) -m open_clip_spiking.offline_teacher --output $(TEACHER_DIR)/lit-effnetlite0-minilm.safetensors --data-root $(DATA)

align: teacher
	$(PY) -m open_clip_spiking.train --stage align --model spikeclip-vit-s \
		--teacher lit-effnetlite0-minilm --teacher-pretrained $(TEACHER_DIR)/lit-effnetlite0-minilm.safetensors \
		--train-data "$(DATA)/imagenette/train/{0..7}.tar" \
		--classnames $(DATA)/imagenette/classnames.txt \
		--templates $(DATA)/imagenette/zeroshot_classification_templates.txt \
		--output-dir $(RUN_DIR) --epochs 1 --train-num-samples $(ALIGN_SAMPLES) --batch-size 32 --workers 1

# Regenerates benchmarks/RESULTS.md and benchmarks/results/. The teacher is built first if it is missing.
results: install
	$(PY) benchmarks/results.py --output benchmarks/RESULTS.md --data-root $(DATA) --work-dir runs/results \
		--teacher-pretrained $(TEACHER_DIR)/lit-effnetlite0-minilm.safetensors \
		$(if $(STUDENT),--student-pretrained $(STUDENT)) $(RESULTS_ARGS)

# Speed and memory of the spiking tower and the align stage on this machine (about an hour on 2 cores).
speed: install
	$(PY) benchmarks/speed.py --output benchmarks/SPEED.md --data-root $(DATA)

# Installs Fashion-MNIST from Debian's dataset-fashion-mnist when neither it nor the demo's shards exist and
# apt-get exists. Never fails: without the package, the demo downloads the data with torchvision, or names
# the ways to get it.
fashion-mnist:
	@if [ -f $(FASHION_MNIST_DIR)/t10k-labels-idx1-ubyte.gz ]; then \
		echo "Fashion-MNIST found in $(FASHION_MNIST_DIR)"; \
	elif [ -f "$(DEMO_CACHE)/fashion_mnist/fashion_mnist.json" ]; then \
		echo "Fashion-MNIST shards found in $(DEMO_CACHE)/fashion_mnist"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; } \
			|| echo "apt-get could not install dataset-fashion-mnist; the demo will try torchvision's download"; \
	else \
		echo "apt-get not found; the demo will download Fashion-MNIST with torchvision"; \
	fi

demo: install fashion-mnist
	$(PY) -m open_clip_spiking.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) runs build dist *.egg-info
