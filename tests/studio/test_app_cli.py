import socket
import subprocess
import sys
from pathlib import Path

import app

ROOT = Path(__file__).resolve().parents[2]


def test_busy_port_is_reported_and_exits_nonzero():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "app.py", "--port", str(port)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"port {port}" in proc.stderr and "already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_device_is_a_message_not_a_traceback(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = app.main(["--port", str(port), "--device", "tpu-9000"])
    assert code == 2
    assert "unknown device" in capsys.readouterr().err


def test_args_defaults():
    args = app.parse_args([])
    assert args.port == 7860 and args.device == "auto" and not args.share


def test_a_folder_that_is_not_a_model_is_refused_with_a_message(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = app.main(["--port", str(port), "--device", "cpu", "--model", str(tmp_path)])
    assert code == 2
    assert "not a model folder" in capsys.readouterr().err
