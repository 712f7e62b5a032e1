# napo's developer entry points. `make demo` and `make test` work on a fresh
# machine: they create .venv with the pinned CPU torch and an editable napo.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CC ?= cc
C_WARNINGS := -std=c11 -Wall -Wextra -Werror -Wpedantic -Wshadow -Wconversion -Wno-sign-conversion
SANITIZE := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1
C_BUILD := csrc/tests/build
C_SOURCES := csrc/objective.c csrc/logps.c
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu)
NVCC ?= $(shell command -v nvcc 2>/dev/null)

.PHONY: demo test test-c test-cuda-emu test-py test-binding-asan lint format cuda-check gpu-check check-cpu-build bench clean install

$(VENV)/.installed: pyproject.toml setup.py requirements/ci-constraints.txt $(wildcard csrc/*.c csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/ci-constraints.txt torch
	$(PY) -m pip install -q -c requirements/ci-constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/napo demo

test: test-c test-cuda-emu test-py

test-py: $(VENV)/.installed
	$(PY) -m pytest -q tests

# The C core alone, under AddressSanitizer and UndefinedBehaviorSanitizer.
test-c:
	mkdir -p $(C_BUILD)
	for test in test_objective test_logps; do \
	  $(CC) $(C_WARNINGS) $(SANITIZE) -Icsrc csrc/tests/$$test.c $(C_SOURCES) -lm -lpthread -o $(C_BUILD)/$$test \
	  && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 $(C_BUILD)/$$test || exit 1; \
	done
	@echo "again with the 4-lane baseline kernels:"
	NAPO_SIMD_WIDTH=4 ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 $(C_BUILD)/test_logps

# napo's CUDA kernels executed on the CPU emulation of CUDA (csrc/cuda/emu: one OS thread per CUDA
# thread), compared with the C CPU kernels, under ASan+UBSan and then under TSan (a missing
# __syncthreads is a data race on shared memory). EMU_SRC is the source tree to build (the mutation
# test in tests/test_cuda_emu.py points it at mutated copies) and EMU_BUILD where to build it.
CXX ?= c++
EMU_SRC ?= csrc
EMU_BUILD ?= $(C_BUILD)/emu
EMU_FLAGS = -std=c++17 -O1 -g -fno-omit-frame-pointer -Wall -Wextra -Werror -I$(EMU_SRC)/cuda/emu/include \
  -I$(EMU_SRC)/cuda/emu -I$(EMU_SRC)
EMU_CUDA := logps objective runtime
EMU_SAN_asan := -fsanitize=address,undefined -fno-sanitize-recover=all
EMU_SAN_tsan := -fsanitize=thread
EMU_SAN_plain :=
EMU_DEPS = $(wildcard $(EMU_SRC)/*.c $(EMU_SRC)/*.h $(EMU_SRC)/cuda/*.cu $(EMU_SRC)/cuda/*.cuh $(EMU_SRC)/cuda/emu/*) \
  $(EMU_SRC)/tests/test_cuda_emu.cpp $(EMU_SRC)/tests/logits_buffer.h

$(EMU_BUILD)/test_cuda_emu_%: $(EMU_DEPS)
	mkdir -p $(EMU_BUILD)/$*
	for f in $(EMU_CUDA); do \
	  $(CXX) $(EMU_FLAGS) $(EMU_SAN_$*) -x c++ -c $(EMU_SRC)/cuda/$$f.cu -o $(EMU_BUILD)/$*/$$f.o || exit 1; \
	done
	$(CXX) $(EMU_FLAGS) $(EMU_SAN_$*) -c $(EMU_SRC)/cuda/emu/cuda_emu.cpp -o $(EMU_BUILD)/$*/cuda_emu.o
	$(CXX) $(EMU_FLAGS) $(EMU_SAN_$*) -c $(EMU_SRC)/tests/test_cuda_emu.cpp -o $(EMU_BUILD)/$*/test_cuda_emu.o
	for f in objective logps; do \
	  $(CC) $(C_WARNINGS) -O1 -g $(EMU_SAN_$*) -I$(EMU_SRC) -c $(EMU_SRC)/$$f.c -o $(EMU_BUILD)/$*/$$f.c.o || exit 1; \
	done
	$(CXX) $(EMU_SAN_$*) $(EMU_BUILD)/$*/*.o -lm -lpthread -o $@

# The emulated kernels as a shared library, for the Python tests against napo's PyTorch reference (ctypes).
$(EMU_BUILD)/libnapo_cuda_emu.so: $(EMU_DEPS)
	mkdir -p $(EMU_BUILD)/lib
	for f in $(EMU_CUDA); do \
	  $(CXX) $(EMU_FLAGS) -fPIC -x c++ -c $(EMU_SRC)/cuda/$$f.cu -o $(EMU_BUILD)/lib/$$f.o || exit 1; \
	done
	$(CXX) $(EMU_FLAGS) -fPIC -c $(EMU_SRC)/cuda/emu/cuda_emu.cpp -o $(EMU_BUILD)/lib/cuda_emu.o
	for f in objective logps; do \
	  $(CC) $(C_WARNINGS) -O1 -fPIC -I$(EMU_SRC) -c $(EMU_SRC)/$$f.c -o $(EMU_BUILD)/lib/$$f.c.o || exit 1; \
	done
	$(CXX) -shared $(EMU_BUILD)/lib/*.o -lm -lpthread -o $@

test-cuda-emu: $(EMU_BUILD)/test_cuda_emu_asan $(EMU_BUILD)/test_cuda_emu_tsan
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 $(EMU_BUILD)/test_cuda_emu_asan
	TSAN_OPTIONS=halt_on_error=1 $(EMU_BUILD)/test_cuda_emu_tsan

# napo._C itself (module.c and the C core) under ASan/UBSan, preloaded into the interpreter, running the
# binding's tests on the CPU. Not part of `make test` (a minute; it needs gcc's libasan and libubsan).
ASAN_DIR := $(C_BUILD)/asan-binding
test-binding-asan: $(VENV)/.installed
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR) && cp -r napo tests pyproject.toml $(ASAN_DIR)/ && rm -f $(ASAN_DIR)/napo/_C*.so
	$(CC) $(C_WARNINGS) $(SANITIZE) -fPIC -shared -I"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
	  -Icsrc csrc/module.c $(C_SOURCES) -lm -lpthread \
	  -o $(ASAN_DIR)/napo/_C"$$($(PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
	cd $(ASAN_DIR) && PYTHONPATH=. LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 $(abspath $(PY)) -m pytest -q \
	  -p no:cacheprovider tests/test_native_numpy.py tests/test_bad_inputs.py tests/test_logps.py tests/test_objective_ops.py

# Compiles every CUDA source with warnings as errors when nvcc exists; a no-op otherwise.
cuda-check:
ifeq ($(NVCC),)
	@echo "nvcc not found: CUDA sources not compiled"
else
	mkdir -p $(C_BUILD)
	for f in $(CUDA_SOURCES); do \
	  $(NVCC) -std=c++17 -O3 --Werror all-warnings -Xcompiler -fPIC,-Wall,-Wextra,-Werror \
	    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	    -c $$f -o $(C_BUILD)/$$(basename $$f .cu).o || exit 1; \
	done
	@echo "CUDA sources compiled: $(CUDA_SOURCES)"
endif

# The whole GPU verification, offline, in under 8 minutes: build, CUDA tests, GPU benchmarks, one
# table (build/gpu-check/gpu_check.md). Without a GPU: build, test collection, and "no GPU".
# A GPU machine has its own CUDA build of torch: the check runs under .venv's python when there is one,
# else under python3 as it is (it installs nothing; GPU_CHECK_ARGS, e.g. --out DIR --budget-s 540).
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror csrc/*.c csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/emu/*.h csrc/cuda/emu/*.cpp \
	  csrc/cuda/emu/include/*.h csrc/tests/*.c csrc/tests/*.cpp csrc/tests/*.h

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i csrc/*.c csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/emu/*.h csrc/cuda/emu/*.cpp \
	  csrc/cuda/emu/include/*.h csrc/tests/*.c csrc/tests/*.cpp csrc/tests/*.h

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_objective.py
	$(PY) benchmarks/bench_logps.py
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_train_step.py

clean:
	rm -rf $(C_BUILD) build *.egg-info napo/_C*.so

# The package must build and work without nvcc: a NAPO_CUDA=0 wheel, installed aside and smoke-tested.
check-cpu-build: $(VENV)/.installed
	rm -rf build/cpu-only && mkdir -p build/cpu-only
	NAPO_CUDA=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w build/cpu-only .
	$(PY) -m pip install -q --no-deps --target build/cpu-only/site build/cpu-only/napo-*.whl
	cd build && PYTHONPATH=cpu-only/site ../$(PY) -c "import torch, napo; from napo import _C; \
	  assert napo.__file__.startswith('$(CURDIR)/build/cpu-only'), napo.__file__; \
	  assert not _C.built_with_cuda(); z = torch.zeros(2); print('CPU-only build OK:', napo.napo_loss(z, z, z, z).tolist())"
