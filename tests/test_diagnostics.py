"""Diagnosis of engine logs: every signature gives its code, the root cause comes before the
wrappers that report it, and a healthy log raises no alarm. Signatures are vLLM's own messages
(each rule names the vLLM issue it was seen in)."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from deployments.runtime.diagnostics import RULES, diagnose

LOGS = Path(__file__).parent / "fixtures" / "vllm_logs"
PREFIX = "INFO 11-27 04:10:01 [utils.py:233] non-default args: {'model': '/models/x'}\n"
WRAPPER = (
    "(APIServer pid=1) RuntimeError: Engine core initialization failed. See root cause above. "
    "Failed core proc(s): {'EngineCore_DP0': 1}\n"
)

SIGNATURES = {
    "no-nvidia-runtime": 'docker: Error response from daemon: could not select device driver "" with capabilities: [[gpu]].',
    "gpu-request-conflict": "Error response from daemon: cannot set both Count and DeviceIDs on device request",
    "no-gpu-visible": "RuntimeError: Failed to infer device type",
    "cuda-driver-mismatch": "RuntimeError: Unexpected error from cudaGetDeviceCount(). Error 803: system has unsupported display driver / cuda driver combination",
    "nccl-shm": "misc/shmutils.cc:72 NCCL WARN Error while creating shared memory segment /dev/shm/nccl-vzIpS6 (size 9637888)",
    "nccl-p2p": "torch.distributed.DistBackendError: NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:275, unhandled cuda error",
    "tp-heads-not-divisible": "ValueError: Total number of attention heads (40) must be divisible by tensor parallel size (3).",
    "quant-tp-misaligned": "ValueError: The input size is not aligned with the quantized weight shape. This can be caused by too large tensor parallel size.",
    "cuda-oom": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 896.00 MiB. GPU 0 has a total capacity of 39.38 GiB",
    "gpu-memory-in-use": "ValueError: Free memory on device (21.3/79.1 GiB) on startup is less than desired GPU memory utilization (0.9, 71.2 GiB).",
    "kv-cache-no-memory": "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing the engine.",
    "kv-cache-max-model-len": "ValueError: To serve at least one request with the model's max seq len (131072), (20.0 GiB KV cache is needed, which is larger than the available KV cache memory (9.3 GiB).",
    "max-model-len-exceeds-config": "ValueError: User-specified max_model_len (200000) is greater than the derived max_model_len (max_position_embeddings=131072 or model_max_length=None in model's config.json).",
    "bf16-unsupported": "ValueError: Bfloat16 is only supported on GPUs with compute capability of at least 8.0. Your Tesla V100-SXM2-32GB GPU has compute capability 7.0.",
    "missing-tokenizer": "TypeError: not a string",
    "trust-remote-code-required": "ValueError: Failed to load the model config. If the model is a custom model not yet available in the HuggingFace transformers library, consider setting `trust_remote_code=True` in LLM or using the `--trust-remote-code` flag in the CLI.",
    "unsupported-architecture": "ValueError: Model architectures ['FooForCausalLM'] are not supported for now. Supported architectures: dict_keys([...])",
    "transformers-too-old": "ValueError: The checkpoint you are trying to load has model type `qwen3_next` but Transformers does not recognize this architecture.",
    "port-in-use": "OSError: [Errno 98] Address already in use",
    "cache-dir-unwritable": "PermissionError: [Errno 13] Permission denied: '/.cache'",
    "missing-compiler": "RuntimeError: Failed to find C compiler. Please specify via CC environment variable.",
    "cuda-fork": "RuntimeError: Cannot re-initialize CUDA in forked subprocess. To use CUDA with multiprocessing, you must use the 'spawn' start method",
    "hf-gated-repo": "huggingface_hub.errors.GatedRepoError: 401 Client Error. Cannot access gated repo for url https://huggingface.co/meta-llama/Llama-3.1-8B/resolve/main/config.json.",
    "hf-offline": "huggingface_hub.errors.OfflineModeIsEnabled: Cannot reach https://huggingface.co/api/models/x/y: offline mode is enabled.",
    "engine-ready-timeout": "TimeoutError: Timed out waiting for engine core processes to start. This is often caused by slow weight loading for large models. Waited 600s (configured by VLLM_ENGINE_READY_TIMEOUT_S).",
    "model-path-not-found": "OSError: Incorrect path_or_model_id: '/models/team-a/gone'. Please provide either the path to a local folder or the repo_id of a model on the Hub.",
    "chat-template-missing": "ValueError: As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat template if the tokenizer does not define one.",
    "gpu-index-unknown": "stderr: nvidia-container-cli: device error: 1: unknown device: unknown.",
    "host-driver-unavailable": "nvidia-container-cli: initialization error: nvml error: driver not loaded: unknown",
    "image-lacks-gpu-arch": "RuntimeError: CUDA error: no kernel image is available for execution on the device",
    "gpu-unsupported": "RuntimeError: GPUs with compute capability below 7.0 are not supported.",
    "quant-unsupported-gpu": "ValueError: The quantization method fp8 is not supported for the current GPU. Minimum capability: 90. Current capability: 86.",
    "pp-unsupported": "NotImplementedError: Pipeline parallelism is not supported for this model. Supported models implement the `SupportsPP` interface.",
    "host-oom-killed": "Killed",
    "config-invalid": "ValueError: Unrecognized model in /models/x. Should have a `model_type` key in its config.json, or contain one of the following strings in its name: albert",
    "disk-full": "OSError: [Errno 28] No space left on device",
    "broken-install": "ImportError: /usr/local/lib/python3.12/dist-packages/flash_attn_2_cuda.so: undefined symbol: _ZN3c105ErrorC2E",
    "engine-args-rejected": "vllm: error: unrecognized arguments: serve /models/x",
    "weights-incomplete": "FileNotFoundError: Weight files referenced in index but missing: {'/models/tiny/model-00002-of-00002.safetensors'}",
    # vLLM 0.32's CPU engine (tests/fixtures/engine-logs/vllm-0.32-cpu/ has the whole logs).
    "shm-too-small": "RuntimeError: Insufficient space in /dev/shm for shared-memory allocation: 160 MiB required, 64 MiB free. Increase /dev/shm (e.g. --shm-size or --ipc=host).",
    "cpu-kv-space-too-large": "(Worker pid=51) ERROR 12-05 21:21:49 [multiproc_executor.py:1063] ValueError: Available memory on node 0 (1.38/3.0 GiB) on kv cache allocation is less than requested memory for kv (4.0 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce max_num_seqs.",
    "worker-signal": "!!!!!!! Segfault encountered !!!!!!!",
    "container-memory-limit": "Memory cgroup out of memory: Killed process 4242 (python3) total-vm:8123456kB, anon-rss:1198000kB",
    "engine-core-died": "(APIServer pid=7) WARNING 12-05 21:16:26 [core_client.py:817] [shutdown] MPClient: engine core exited unexpectedly; starting cleanup",
}


def test_every_rule_has_a_signature_test() -> None:
    structural = {"tokenizer-unreadable"}  # recognised by where it is raised: test below
    assert {rule.code for rule in RULES} - {"engine-core-failed"} - structural == set(SIGNATURES)


@pytest.mark.parametrize(("code", "signature"), SIGNATURES.items(), ids=list(SIGNATURES))
def test_signature_gives_its_code_first_even_behind_the_wrapper(code: str, signature: str) -> None:
    log = (
        PREFIX
        + "(Worker_TP0 pid=245) ERROR Traceback (most recent call last):\n"
        + signature
        + "\n"
        + WRAPPER
    )
    findings = diagnose(log, exit_code=1)
    assert findings[0].code == code
    assert findings[0].line_number == 3
    assert findings[0].remedy
    assert [finding.code for finding in findings][-1] == "engine-core-failed"


def test_healthy_log_with_harmless_warnings_is_none() -> None:
    findings = diagnose((LOGS / "healthy.log").read_text())
    assert [finding.code for finding in findings] == ["none"]


def test_oom_behind_two_wrappers_is_the_root_cause() -> None:
    findings = diagnose((LOGS / "oom-wrapped.log").read_text(), exit_code=1)
    assert [finding.code for finding in findings] == ["cuda-oom", "engine-core-failed"]
    assert findings[0].line_number == 7
    assert "Tried to allocate 448.00 MiB" in findings[0].line


def test_field_report_lesson_6_is_an_unwritable_cache_not_the_v1_engine() -> None:
    findings = diagnose((LOGS / "seed-frozen-os.log").read_text(), exit_code=1)
    assert findings[0].code == "cache-dir-unwritable"
    assert "writable cache volume" in findings[0].remedy
    assert "VLLM_USE_V1=0 is not the fix" in findings[0].remedy


def test_exit_137_without_a_traceback_is_a_host_oom_kill_only_with_the_oom_flag() -> None:
    log = (
        PREFIX
        + "Loading safetensors checkpoint shards:  43% Completed | 13/30 [00:41<00:54,  3.21s/it]\n"
    )
    assert diagnose(log, exit_code=137, oom_killed=True)[0].code == "host-oom-killed"
    assert diagnose(log + WRAPPER, exit_code=137, oom_killed=True)[0].code == "host-oom-killed"
    # SIGKILL with Docker's OOMKilled false: docker kill, a supervisor (issue 15, finding 11).
    assert diagnose(log, exit_code=137, oom_killed=False)[0].code == "killed-from-outside"
    assert diagnose(log, exit_code=137)[0].code == "host-oom-killed"  # the flag not known
    assert diagnose(log, exit_code=0)[0].code == "none"


def test_an_unknown_error_is_reported_with_its_line_rather_than_hidden() -> None:
    log = PREFIX + "Traceback (most recent call last):\nKeyError: 'rope_theta'\n" + WRAPPER
    findings = diagnose(log, exit_code=1)
    assert (findings[0].code, findings[0].line_number, findings[0].line) == (
        "unrecognized-error",
        3,
        "KeyError: 'rope_theta'",
    )


def test_diagnose_cli_json_shape(tmp_path: Path) -> None:
    out = StringIO()
    call_command("diagnose", str(LOGS / "oom-wrapped.log"), "--json", stdout=out)
    result = json.loads(out.getvalue())
    assert list(result) == ["findings"]
    assert list(result["findings"][0]) == ["code", "title", "remedy", "line_number", "line"]
    assert result["findings"][0]["code"] == "cuda-oom"
    out = StringIO()
    call_command("diagnose", str(LOGS / "healthy.log"), "--json", stdout=out)
    assert [f["code"] for f in json.loads(out.getvalue())["findings"]] == ["none"]


OOM_TWO_TENANTS = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
    "capacity of 79.15 GiB of which 300.00 MiB is free. Process 1234 has 30.00 GiB memory in use. "
    "Process 5678 has 48.50 GiB memory in use. Of the allocated memory 46.20 GiB is allocated by "
    "PyTorch, and 1.10 GiB is reserved by PyTorch but unallocated."
)


def test_oom_on_a_gpu_another_process_fills_is_gpu_memory_in_use() -> None:
    # Found by hand: torch lists every process on the GPU; in a container it cannot tell which
    # is its own, so the engine is the entry that holds what PyTorch allocated and the rest is
    # someone else's memory.
    findings = diagnose(PREFIX + OOM_TWO_TENANTS + "\n" + WRAPPER, exit_code=1)
    assert findings[0].code == "gpu-memory-in-use"
    assert findings[0].line_number == 2


def test_oom_whose_only_process_is_the_engine_stays_cuda_oom() -> None:
    line = (  # vllm-project/vllm#8903: the one process listed is the engine itself
        "CUDA out of memory. Tried to allocate 19.63 GiB. GPU 3 has a total capacity of 79.15 GiB "
        "of which 17.73 GiB is free. Process 78729 has 61.41 GiB memory in use. Of the allocated "
        "memory 56.64 GiB is allocated by PyTorch, and 4.07 GiB is reserved by PyTorch but "
        "unallocated."
    )
    assert diagnose(PREFIX + line, exit_code=1)[0].code == "cuda-oom"


def test_old_torch_oom_with_memory_outside_pytorch_is_gpu_memory_in_use() -> None:
    line = (  # vllm-project/vllm#783: 16 of 44.56 GiB held by other processes
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.63 GiB (GPU 0; "
        "44.56 GiB total capacity; 27.91 GiB already allocated; 565.31 MiB free; 27.93 GiB "
        "reserved in total by PyTorch)"
    )
    assert diagnose(line)[0].code == "gpu-memory-in-use"


def test_tokenizer_type_error_is_diagnosed_by_the_frame_that_raised_it() -> None:
    # Found by hand: a tokenizer whose vocabulary file is missing gets None for its path.
    error = "TypeError: expected str, bytes or os.PathLike object, not NoneType"
    frame = '  File "/models/x/tokenization_qwen.py", line 101, in load_tiktoken_bpe'
    log = f"Traceback (most recent call last):\n{frame}\n    open(None)\n{error}\n"
    assert diagnose(log, exit_code=1)[0].code == "missing-tokenizer"
    elsewhere = log.replace("tokenization_qwen.py", "engine.py").replace("load_tiktoken_bpe", "run")
    assert diagnose(elsewhere, exit_code=1)[0].code == "unrecognized-error"


def test_key_error_from_transformers_config_mapping_is_an_unknown_model_type() -> None:
    log = (
        "Traceback (most recent call last):\n"
        '  File "/usr/lib/python3/transformers/models/auto/configuration_auto.py", line 691, '
        "in __getitem__\n    raise KeyError(key)\nKeyError: 'mllama'\n"
    )
    assert diagnose(log, exit_code=1)[0].code == "transformers-too-old"


def test_trust_remote_code_in_an_engine_config_dump_is_not_an_alarm() -> None:
    line = (
        "INFO 12-20 00:49:35 llm_engine.py:237] Initializing an LLM engine (vdev) with config: "
        "model='/models/x', trust_remote_code=True, dtype=torch.bfloat16, max_seq_len=8192"
    )
    assert [f.code for f in diagnose(line)] == ["none"]


def test_a_gpu_too_old_for_vllm_explains_its_bfloat16_error() -> None:
    log = (  # vllm-project/vllm#1284: --dtype half cannot help a P100
        "Bfloat16 is only supported on GPUs with compute capability of at least 8.0. Your Tesla "
        "P100-PCIE-16GB GPU has compute capability 6.0.\n"
        "RuntimeError: GPUs with compute capability below 7.0 are not supported.\n"
    )
    assert [f.code for f in diagnose(log, exit_code=1)] == ["gpu-unsupported"]


def test_container_toolkit_errors_name_their_cause() -> None:
    hook = "stderr: Auto-detected mode as 'legacy'\nnvidia-container-cli: "
    cases = {
        "requirement error: unsatisfied condition: cuda>=12.8, please update your driver to a "
        "newer version, or use an earlier cuda container: unknown": "cuda-driver-mismatch",
        "initialization error: load library failed: libnvidia-ml.so.1: cannot open shared "
        "object file: no such file or directory: unknown.": "host-driver-unavailable",
        "device error: 1: unknown device: unknown.": "gpu-index-unknown",
    }
    for error, code in cases.items():
        assert diagnose(hook + error)[0].code == code, error


def test_a_json_error_while_loading_the_tokenizer_is_an_unreadable_tokenizer() -> None:
    # vLLM 0.32 on a truncated tokenizer.json: json raises, several frames below the tokenizer.
    base = "/opt/vllm/lib/python3.11/site-packages/transformers/tokenization_utils_base.py"
    log = (
        "Traceback (most recent call last):\n"
        f'  File "{base}", line 1909, in _from_pretrained\n'
        "    tokenizer_file_handle = json.load(tokenizer_file_handle)\n"
        '  File "/usr/lib/python3.11/json/decoder.py", line 355, in raw_decode\n'
        '    raise JSONDecodeError("Expecting value", s, err.value) from None\n'
        "json.decoder.JSONDecodeError: Expecting value: line 1 column 4259 (char 4258)\n"
    )
    assert diagnose(log, exit_code=1)[0].code == "tokenizer-unreadable"


def test_an_exception_quoted_in_a_warning_is_not_an_error() -> None:
    warning = (  # vLLM 0.32 on a host whose file limit it cannot raise
        "(APIServer pid=7) WARNING 12-05 21:06:20 [system_utils.py:255] Found ulimit of 20000 and "
        "failed to automatically increase with error current limit exceeds maximum limit. This "
        "can cause fd limit errors like `OSError: [Errno 24] Too many open files`. Consider "
        "increasing with ulimit -n"
    )
    assert [f.code for f in diagnose(PREFIX + warning)] == ["none"]
