"""``tools/uv_pip.py``: pip's index settings become uv flags (pip's precedence kept)."""

from __future__ import annotations

from tools.uv_pip import pip_index_flags

LISTING = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.find-links='/opt/wheels'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/elsewhere'
global.index-url='https://mirror.example/simple'
install.index-url='https://install.example/simple'
"""


def test_pip_settings_become_uv_flags():
    assert pip_index_flags(LISTING) == [
        *("--index-url", "https://install.example/simple"),  # [install] over [global]
        *("--extra-index-url", "file:///opt/pypi/simple"),
        *("--extra-index-url", "file:///opt/pypi-more/simple"),
        *("--find-links", "/opt/wheels"),  # PIP_FIND_LINKS over pip.conf
        *("--constraint", "/etc/xdg/pip/constraints.txt"),
        *("--index-strategy", "unsafe-best-match"),  # pip's pick: best version of all indexes
    ]


def test_no_settings_and_no_index():
    assert pip_index_flags("") == ["--index-strategy", "unsafe-best-match"]
    assert "--no-index" in pip_index_flags(":env:.no-index='true'\n")
