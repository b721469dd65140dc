"""The options table: TOML file, environment and flags; every refusal names its key; --check-config."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

import pytest
from conftest import run_slitterd

import slitter
from slitter import address
from slitterd import config
from slitterd.main import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "slitterd.toml"
DOC = ROOT / "doc" / "operations.md"


def build(tmp_path: Path, toml: str | None = None, argv: tuple[str, ...] = (), env: dict | None = None):
    args = list(argv)
    if toml is not None:
        path = tmp_path / "c.toml"
        path.write_text(toml)
        args = ["--config", str(path), *args]
    return config.build(config.parse_args(args), env or {})


def test_defaults(tmp_path):
    cfg = build(tmp_path)
    assert (cfg.name, cfg.socket_mode, cfg.socket_group, cfg.arena_size, cfg.max_clients, cfg.metrics,
            cfg.error_policy, cfg.log_level, cfg.classes, cfg.ephemeral) == (
        "default", 0o600, None, 64 << 30, 64, None, "raise", "INFO", (), False)
    assert cfg.socket.endswith("/default.sock")


def test_file_values_and_precedence(tmp_path):
    toml = """
name = "fromfile"
socket = "/run/x/f.sock"
socket_mode = 0o660
arena_size = "2G"
max_clients = 8
metrics = "9464"
error_policy = "log"
log_level = "debug"
ephemeral = true

[[classes]]
name = "order"
size = 64
zero_init = true
cap = 1_000

[[classes]]
name = "quote"
size = 256
"""
    cfg = build(tmp_path, toml)
    assert (cfg.name, cfg.socket, cfg.socket_mode, cfg.arena_size, cfg.max_clients, cfg.metrics,
            cfg.error_policy, cfg.log_level, cfg.ephemeral) == (
        "fromfile", "/run/x/f.sock", 0o660, 2 << 30, 8, ("127.0.0.1", 9464), "log", "DEBUG", True)
    assert cfg.classes == (config.ClassConfig("order", 64, True, 1000), config.ClassConfig("quote", 256, False, None))
    assert cfg.config_file == str(tmp_path / "c.toml")
    # environment beats the file, a flag beats both
    cfg = build(tmp_path, toml, env={"SLITTERD_MAX_CLIENTS": "9", "SLITTERD_NAME": "fromenv"},
                argv=("--name", "fromflag", "--metrics", "[::1]:9000", "--no-ephemeral", "--socket-mode", "600"))
    assert (cfg.max_clients, cfg.name, cfg.metrics, cfg.ephemeral, cfg.socket_mode) == (
        9, "fromflag", ("::1", 9000), False, 0o600)
    # $SLITTERD_CONFIG names the file when --config does not
    cfg = config.build(config.parse_args([]), {"SLITTERD_CONFIG": str(tmp_path / "c.toml")})
    assert cfg.name == "fromfile"


REFUSALS = [
    ('arena_sise = "1G"', "unknown key 'arena_sise' (did you mean 'arena_size'?)"),
    ('config = "x"', "unknown key 'config'"),
    ('arena_size = "lots"', "arena_size: not a size"),
    ('arena_size = 1000', "arena_size: arena size must be a multiple"),
    ('arena_size = -5', "arena_size: must be positive"),
    ('name = "../etc"', "name: instance name"),
    ('name = 7', "name: must be a string"),
    ('socket = ""', "socket: must not be empty"),
    ('socket_mode = "0666"', "socket_mode: 0o666 grants more than owner and group"),
    ('socket_mode = "0400"', "socket_mode: 0o400 must let the owner read and write"),
    ('socket_mode = "rw"', "socket_mode: not an octal mode"),
    ('socket_group = "no-such-group-here"', "socket_group: no group 'no-such-group-here'"),
    ('max_clients = 0', "max_clients: must be at least 1"),
    ('max_clients = "many"', "max_clients: must be an integer"),
    ('max_clients = true', "max_clients: must be an integer"),
    ('ephemeral = "maybe"', "ephemeral: must be true or false"),
    ('metrics = "localhost:http"', "metrics: port 'http' is not 0-65535"),
    ('metrics = "example.org:9464"', "metrics: 'example.org' is not an IP address"),
    ('metrics = "127.0.0.1:70000"', "metrics: port '70000' is not 0-65535"),
    ('error_policy = "ignore"', "error_policy: 'ignore' is not one of raise, log, abort"),
    ('log_level = "LOUD"', "log_level: 'LOUD' is not one of DEBUG"),
    ('shelf_idle = 0', "shelf_idle: must be between 0.01 and 3600 seconds"),
    ('shelf_idle = "soon"', "shelf_idle: must be a number of seconds"),
    ('shelf_idle = true', "shelf_idle: must be between 0.01 and 3600 seconds"),
    ('classes = "order"', "classes: must be an array of tables"),
    ('[[classes]]\nname = "a"', "classes[0]: missing key 'size'"),
    ('[[classes]]\nsize = 8', "classes[0]: missing key 'name'"),
    ('[[classes]]\nname = "a"\nsize = 8\nsise = 9', "classes[0]: unknown key 'sise'"),
    ('[[classes]]\nname = "a"\nsize = 0', "classes[0].size: 0 is not 1-"),
    ('[[classes]]\nname = "a\\u0000b"\nsize = 8', "classes[0].name: 'a\\x00b': a class name must be printable"),
    ('[[classes]]\nname = "tab\\there"\nsize = 8', "classes[0].name: 'tab\\there': a class name must be printable"),
    ('[[classes]]\nname = "a"\nsize = "8"', "classes[0].size: must be an integer"),
    ('[[classes]]\nname = "a"\nsize = 8\ncap = 0', "classes[0].cap: must be at least 1"),
    ('[[classes]]\nname = "a"\nsize = 8\ncap = -3', "classes[0].cap: must be at least 1"),
    ('[[classes]]\nname = "a"\nsize = 8\ncap = 1.5', "classes[0].cap: must be an integer"),
    ('[[classes]]\nname = "a"\nsize = 8\ncap = "10"', "classes[0].cap: must be an integer"),
    ('[[classes]]\nname = "a"\nsize = 8\nzero_init = "yes"', "classes[0].zero_init: must be true or false"),
    ('[[classes]]\nname = "a"\nsize = 8\nzero_init = 1', "classes[0].zero_init: must be true or false"),
    ('[[classes]]\nname = "' + "n" * 48 + '"\nsize = 8', "classes[0].name: "),
    ('[[classes]]\nname = "a"\nsize = 8\n[[classes]]\nname = "a"\nsize = 8',
     "classes[1].name: class 'a' is declared twice"),
    ("\n".join(f'[[classes]]\nname = "c{i}"\nsize = 8' for i in range(64)),
     "classes: 64 declared; an instance has at most 63"),
    ('name = "unterminated', "not valid TOML"),
]


@pytest.mark.parametrize(("toml", "message"), REFUSALS, ids=[r[1][:40] for r in REFUSALS])
def test_file_refusals_name_the_key(tmp_path, toml, message):
    with pytest.raises(config.ConfigError) as info:
        build(tmp_path, toml)
    assert message in str(info.value)
    assert str(info.value).startswith(str(tmp_path / "c.toml") + ": ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("env", "argv", "message"), [
    ({"SLITTERD_MAX_CLIENTS": "abc"}, (), "$SLITTERD_MAX_CLIENTS: must be an integer"),
    ({"SLITTERD_ARENA_SIZE": "1000"}, (), "$SLITTERD_ARENA_SIZE: arena size must be a multiple"),
    ({"SLITTERD_EPHEMERAL": "perhaps"}, (), "$SLITTERD_EPHEMERAL: must be true or false"),
    ({}, ("--socket-mode", "777"), "--socket-mode: 0o777 grants more"),
    ({}, ("--metrics", "[::1]9000"), "--metrics: not [ADDRESS]:PORT"),
    ({}, ("--config", "/nonexistent/slitterd.toml"), "/nonexistent/slitterd.toml: cannot read"),
])
def test_env_and_flag_refusals_name_the_source(tmp_path, env, argv, message):
    with pytest.raises(config.ConfigError, match="^" + message.replace("$", r"\$").replace("[", r"\[")):
        build(tmp_path, argv=argv, env=env)


def test_main_refuses_with_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('max_clients = 0\n')
    for argv in (["--config", str(bad)], ["--check-config", str(bad)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"slitterd: {bad}: max_clients: must be at least 1, not 0\n"


def test_check_config_of_a_good_file(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text('name = "x"\nsocket = "/run/slitter/x.sock"\n[[classes]]\nname = "a"\nsize = 8\n')
    assert main(["--check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{good}: ok: instance 'x' on /run/slitter/x.sock") and "1 classes" in out
    assert not address.segment_paths("x")[0].exists(), "--check-config starts nothing"


def test_example_config_validates(tmp_path):
    """deploy/slitterd.toml is valid; its group must exist on the host, as sysusers.d/slitter.conf makes it."""
    try:
        grp.getgrnam("slitter")
        has_group = True
    except KeyError:
        has_group = False
    r = run_slitterd("--check-config", str(EXAMPLE), cwd=tmp_path)
    if has_group:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 2
        assert r.stderr == f"slitterd: {EXAMPLE}: socket_group: no group 'slitter' on this host\n"
        r = run_slitterd("--check-config", str(EXAMPLE), "--socket-group", str(os.getgid()), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    assert "instance 'default' on /run/slitter/default.sock (mode 0660" in r.stdout
    assert "2 classes, metrics on 127.0.0.1:9464" in r.stdout
    cfg = build(tmp_path, EXAMPLE.read_text(), argv=("--socket-group", str(os.getgid())))
    assert cfg.classes[0] == config.ClassConfig("order", 64, True, 1_000_000)


def test_bad_file_at_start_is_one_line_no_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nlog_levle = "INFO"\n')
    r = run_slitterd("--config", str(bad), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == f"slitterd: {bad}: unknown key 'log_levle' (did you mean 'log_level'?)\n"
    r = run_slitterd("--bogus-flag", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--bogus-flag" in r.stderr


def test_declared_classes_and_socket_access_applied(manual_daemon):
    d = manual_daemon("--ephemeral")
    group = grp.getgrgid(os.getgid()).gr_name
    cfg = d.log.parent / "c.toml"
    cfg.write_text(f'socket_mode = "0660"\nsocket_group = "{group}"\n'
                   '[[classes]]\nname = "order"\nsize = 64\nzero_init = true\ncap = 10\n')
    d.start("--config", str(cfg))
    with slitter.connect(d.address) as heap:
        order = heap.stats()["classes"]["order"]
        assert (order["size"], order["zero_init"]) == (64, True)
        assert order["cap"] == 10
        cls = heap.register_class("order", size=64, zero_init=True)
        assert len({cls.allocate() for _ in range(10)}) == 10
        with pytest.raises(slitter.OutOfMemory, match="cap of 10"):
            cls.allocate()
        with pytest.raises(slitter.ClassConflict):
            heap.register_class("order", size=65)
    for path in (Path(d.address), *address.segment_paths(d.name)):
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, os.getgid()), path


def test_every_option_is_documented():
    doc = DOC.read_text()
    for opt in config.OPTIONS:
        assert f"`{opt.name}`" in doc, opt.name
        if opt.cli:
            assert f"`{opt.flag}`" in doc and f"`{opt.env}`" in doc, opt.name
    for flag in ("--config", "--check-config", "SLITTERD_CONFIG"):
        assert flag in doc
    begin, end = "<!-- options:begin -->\n", "<!-- options:end -->"
    table = doc[doc.index(begin) + len(begin):doc.index(end)]
    assert table == config.options_markdown(), (
        "doc/operations.md is stale: paste the output of "
        "python -c 'from slitterd.config import options_markdown; print(options_markdown(), end=\"\")'")
