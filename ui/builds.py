"""Building the built-in demo families from the app: the tiny one inline on first use, the smol one in a
server-side thread every browser session can watch.

Contract: `ensure_tiny()` builds the tiny family once (with a progress bar) when its family file is missing;
`build_job(name)` is the server's one `BuildJob` for a family, shared by every session; `build_progress(job)` is
a fragment that refreshes the job's progress bar while it runs and reruns the page when it ends. Builds are
resumable stage by stage (`safesub_core.demo`), so a server restart mid-build loses at most the stage in progress.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from safesub_core import demo, settings
from safesub_core.errors import SafesubError
from ui.widgets import progress_callback

_BUILD_LOCK = threading.Lock()


@dataclass
class BuildJob:
    """A family build running in a background thread of the server, so a long build goes on while people browse,
    and every session sees its progress."""

    name: str
    done: int = 0
    total: int = 1
    message: str = "waiting to start"
    error: str | None = None
    thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, build: Callable[[Callable], Any]) -> None:
        """Run `build(progress)` in a thread unless one is running; a SafesubError ends it with `error` set."""
        with _BUILD_LOCK:
            if self.running:
                return
            self.done, self.total, self.message, self.error = 0, 1, "starting", None

            def progress(done, total, message=""):
                self.done, self.total, self.message = done, max(total, 1), message or f"{done}/{total}"

            def run():
                try:
                    build(progress)
                    self.message = "built"
                except SafesubError as err:
                    self.error = str(err)
                except Exception as err:  # noqa: BLE001  (shown as one line; the stages built so far are kept)
                    self.error = f"family '{self.name}': the build stopped ({type(err).__name__}: {err})"

            self.thread = threading.Thread(target=run, name=f"safesub-build-{self.name}", daemon=True)
            self.thread.start()


@st.cache_resource(show_spinner=False)
def build_job(name: str) -> BuildJob:
    """The server's one build job for the built-in family `name` (shared by every browser session)."""
    return BuildJob(name)


def build_progress(job: BuildJob, every: float = 2.0) -> None:
    """The job's progress bar, refreshed every `every` seconds while it runs; the page reruns when it ends."""

    @st.fragment(run_every=every if job.running else None)
    def panel():
        if job.error:
            st.error(job.error, icon="⚠️")
        elif job.running:
            st.progress(min(1.0, job.done / job.total), text=f"Building the {job.name} family: {job.message}")
            st.caption("The build runs on the server: you can use the other pages meanwhile.")
        if not job.running and st.session_state.get(f"_watching_{job.name}"):
            st.session_state.pop(f"_watching_{job.name}")
            st.rerun(scope="app")  # the build ended: show its family (or its error)
        if job.running:
            st.session_state[f"_watching_{job.name}"] = True

    panel()


def smol_file() -> Path:
    """The smol family's family file at the server's size (SAFESUB_SMOL_SIZE; the tests use 'test')."""
    return demo.family_file("smol", settings.smol_size())


def start_smol_build() -> BuildJob:
    job = build_job("smol")
    job.start(lambda progress: demo.build("smol", size=settings.smol_size(), progress=progress))
    return job


def ensure_tiny() -> Path:
    """The built-in tiny family's family file, built here first (with a progress bar) when it is missing."""
    path = demo.family_file("tiny")
    if path.is_file():
        return path
    with _BUILD_LOCK:
        if not path.is_file():
            bar = st.progress(0.0, text="Building the built-in tiny family (first run only)")
            demo.build("tiny", progress=progress_callback(bar, "Building the tiny family"))
            bar.empty()
    return path
