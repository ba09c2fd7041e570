"""Which of a server's last lines say why it ended: exact cases from llama-server, Ollama, the loader, C++."""

from __future__ import annotations

from launcher.supervise.server_errors import server_error


def test_an_invalid_argument_is_the_whole_reason() -> None:
    lines = ["error: invalid argument: --no-mmap"]
    assert server_error(lines) == "error: invalid argument: --no-mmap"


def test_llama_cpp_lines_lose_their_time_and_keep_the_cause_and_the_end() -> None:
    lines = [
        "0.00.049.725 I srv  llama_server: initializing ...",
        "0.00.050.075 W srv  llama_server: security: no API key is set",
        "0.00.053.724 E llama_model_load: error loading model: tensor 'output.weight' data is not in the file",
        "0.00.053.732 E llama_model_load_from_file_impl: failed to load model",
        "0.00.053.894 E llama_model_load: error loading model: tensor 'output.weight' data is not in the file",
        "0.00.053.900 E srv    load_model: failed to load model, '/m/broken.gguf'",
        "0.00.053.901 I srv    operator(): cleaning up before exit...",
        "0.00.065.812 E srv  llama_server: exiting due to model loading error",
    ]
    assert server_error(lines) == (
        "llama_model_load: error loading model: tensor 'output.weight' data is not in the file; "
        "srv load_model: failed to load model, '/m/broken.gguf'; srv llama_server: exiting due to model loading error"
    )


def test_ollama_the_loader_and_cpp_say_it_in_their_words() -> None:
    ollama = [
        "time=2026-12-01 level=INFO msg=starting",
        "Error: listen tcp 127.0.0.1:11434: bind: address already in use",
    ]
    assert server_error(ollama) == "Error: listen tcp 127.0.0.1:11434: bind: address already in use"
    loader = ["llama-server: error while loading shared libraries: libcuda.so.1: cannot open shared object file"]
    assert server_error(loader) == loader[0]
    cpp = ["terminate called after throwing an instance of 'std::runtime_error'", "  what():  bad alloc"]
    assert server_error(cpp) == "terminate called after throwing an instance of 'std::runtime_error'; what(): bad alloc"


def test_without_an_error_line_the_last_lines_say_it_and_nothing_is_none() -> None:
    assert server_error(["loading", "step 1", "step 2", "Killed"]) == "step 1; step 2; Killed"
    assert server_error([]) is None
    assert server_error(["error_count=0", "done"]) == "error_count=0; done"  # `error` as a word only


def test_a_long_line_is_shortened() -> None:
    said = server_error(["error: " + "x" * 1000])
    assert said is not None and len(said) == 300 and said.endswith("...")
