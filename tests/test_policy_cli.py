"""`policy list / show / check` through the CLI (SPEC §9, §11, §12).

Every refusal must be exit 2 with exactly one ``Error:`` line on stderr that names the policy
file (or built-in name) and the offending key, and nothing on stdout.
"""

from __future__ import annotations

import textwrap
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from altp2m_replay.cli import main

BUILTINS = (
    "none",
    "baseline",
    "memaccess-write",
    "xen-access-altp2m-write",
    "xen-access-altp2m-exec",
    "drakvuf-hidden-breakpoints",
    "drakvuf-hidden-breakpoints-fast",
    "hvmi-ve-pagetables",
    "split-rx",
    "split-rx-mtf",
    "codemon-flip",
    "drakvuf-syscalls",
    "smartvmi-breakpoints-emulate",
)


# --------------------------------------------------------------------------- helpers
def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_policy(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def check_error(args, *needles) -> str:
    """Run the CLI expecting a refusal: exit 2, one ``Error:`` line holding every needle."""
    result = cli(*args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def policy_error(tmp_path: Path, text: str, *needles) -> str:
    """``policy check`` of TEXT must be refused with a line naming the file and the needles."""
    path = write_policy(tmp_path, text)
    line = check_error(["policy", "check", path], str(path), *needles)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert before == ["p.toml"], before  # nothing written next to it
    return line


def check_ok(*args):
    result = cli("policy", "check", *args)
    assert result.exit_code == 0, (result.exit_code, result.output)
    assert "Error" not in result.stderr and "Traceback" not in result.output
    return result


def warnings_of(result) -> list[str]:
    lines = result.stderr.splitlines()
    assert all(line.startswith("warning: ") for line in lines), result.stderr
    return lines


# --------------------------------------------------------------------------- list / show / check
def test_policy_list_names_every_builtin_with_a_description():
    result = cli("policy", "list")
    assert result.exit_code == 0, result.output
    listed = {}
    for line in result.stdout.splitlines():
        name, _, rest = line.strip().partition(" ")
        listed[name] = rest.strip()
    assert set(BUILTINS) <= set(listed), sorted(set(BUILTINS) - set(listed))
    for name in BUILTINS:
        assert listed[name], f"{name} has no description in `policy list`"


@pytest.mark.parametrize("name", BUILTINS)
def test_policy_show_prints_toml_with_that_name(name, tmp_path):
    result = cli("policy", "show", name)
    assert result.exit_code == 0, result.output
    doc = tomllib.loads(result.stdout)
    assert doc["name"] == name
    assert doc.get("description")
    # what `show` prints is a policy file in its own right
    path = write_policy(tmp_path, result.stdout, f"{name}.toml")
    again = check_ok(path)
    assert again.stdout.startswith(f"{name}: ok")


def test_policy_show_of_a_file_prints_its_text(tmp_path):
    text = 'name = "mine"\ndescription = "d"\n\n[[view]]\nname = "v"\n'
    path = write_policy(tmp_path, text)
    result = cli("policy", "show", path)
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.stdout) == tomllib.loads(text)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_passes_policy_check(name):
    result = check_ok(name)
    assert result.stdout.startswith(f"{name}: ok")


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_passes_policy_check_on_a_generated_trace(name, kernel_trace):
    result = check_ok(name, "--trace", kernel_trace)
    assert result.stdout.startswith(f"{name}: ok")
    assert "setup on kern" in result.stdout


# --------------------------------------------------------------------------- files and names
def test_missing_policy_file(tmp_path):
    path = tmp_path / "nope.toml"
    check_error(["policy", "check", path], str(path))
    check_error(["policy", "show", path], str(path))
    assert not path.exists()


@pytest.mark.parametrize("command", ["check", "show"])
def test_unknown_builtin_name_suggests_the_close_one(command):
    check_error(
        ["policy", command, "xen-acess-altp2m-write"],
        "xen-acess-altp2m-write",
        'did you mean "xen-access-altp2m-write"',
    )


def test_broken_toml_names_the_file_and_the_line(tmp_path):
    line = policy_error(tmp_path, 'name = "x"\n[domain\nmonitor = true\n', "TOML")
    assert "line 2" in line


def test_policy_without_a_name(tmp_path):
    policy_error(tmp_path, 'description = "no name"\n', '"name"')


# --------------------------------------------------------------------------- unknown keys
UNKNOWN_KEYS = {
    "top-level": (
        """
        name = "x"
        [[on_violations]]
        action = "emulate"
        """,
        "on_violations",
        "on_violation",
    ),
    "domain": (
        """
        name = "x"
        [domain]
        monitr = true
        """,
        "monitr",
        "monitor",
    ),
    "view": (
        """
        name = "x"
        [[view]]
        name = "a"
        default_acess = "rx"
        """,
        "default_acess",
        "default_access",
    ),
    "setup": (
        """
        name = "x"
        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = 5
        acces = "rx"
        """,
        "acces",
        "access",
    ),
    "on_violation": (
        """
        name = "x"
        [[on_violation]]
        action = "emulate"
        knd = "w"
        """,
        "knd",
        "kind",
    ),
    "on_ve": (
        """
        name = "x"
        [[setup]]
        op = "enable_notify"
        [on_ve]
        action = "emulate"
        actoin = "emulate"
        """,
        "actoin",
        "action",
    ),
    "costs": (
        """
        name = "x"
        [costs]
        vm_event_synk = 1000
        """,
        "vm_event_synk",
        "vm_event_sync",
    ),
}


@pytest.mark.parametrize("where", list(UNKNOWN_KEYS))
def test_unknown_key_is_refused_with_did_you_mean(where, tmp_path):
    text, bad, good = UNKNOWN_KEYS[where]
    policy_error(tmp_path, text, f'"{bad}"', f'did you mean "{good}"')


# --------------------------------------------------------------------------- other refusals
OTHER_REFUSALS = {
    "unknown setup op": (
        """
        name = "x"
        [[setup]]
        op = "set_mem_acess"
        """,
        ["setup[0]", "set_mem_acess", 'did you mean "set_mem_access"'],
    ),
    "missing setup key": (
        """
        name = "x"
        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = 5
        """,
        ["setup[0]", '"access"'],
    ),
    "unknown action": (
        """
        name = "x"
        [[on_violation]]
        action = "emulat"
        """,
        ["on_violation[0]", "emulat", 'did you mean "emulate"'],
    ),
    "unknown view name": (
        """
        name = "x"
        [[view]]
        name = "watch"
        default_access = "rx"
        [[on_violation]]
        view = "wach"
        action = "emulate"
        """,
        ["on_violation[0]", "wach", 'did you mean "watch"'],
    ),
    "undeclared view index": (
        """
        name = "x"
        [[setup]]
        op = "switch_p2m"
        view = 3
        """,
        ["setup[0]", "3"],
    ),
    "bad kind": (
        """
        name = "x"
        [[on_violation]]
        kind = "e"
        action = "emulate"
        """,
        ["on_violation[0]", '"kind"'],
    ),
    "switch without to": (
        """
        name = "x"
        [[view]]
        name = "a"
        [[on_violation]]
        action = "switch"
        """,
        ["on_violation[0]", '"to"'],
    ),
    "to on emulate": (
        """
        name = "x"
        [[on_violation]]
        action = "emulate"
        to = 0
        """,
        ["on_violation[0]", '"to"'],
    ),
    "on_ve with altp2m off": (
        """
        name = "x"
        [domain]
        altp2m = false
        [on_ve]
        action = "emulate"
        """,
        ["[on_ve]", "altp2m"],
    ),
    "two views with one name": (
        """
        name = "x"
        [[view]]
        name = "a"
        [[view]]
        name = "a"
        """,
        ["view[1]", '"a"'],
    ),
    "view named host": (
        """
        name = "x"
        [[view]]
        name = "host"
        """,
        ["view[0]", '"name"'],
    ),
    "negative cost": (
        """
        name = "x"
        [costs]
        ept_exit = -1
        """,
        ["[costs]", "ept_exit", "-1"],
    ),
    "non-numeric cost": (
        """
        name = "x"
        [costs]
        mmio = "lots"
        """,
        ["[costs]", "mmio", "lots"],
    ),
    "xen version": (
        """
        name = "x"
        [domain]
        xen = "four"
        """,
        ["[domain]", '"xen"', "four"],
    ),
    "non-boolean": (
        """
        name = "x"
        [domain]
        monitor = "yes"
        """,
        ["[domain]", '"monitor"', "yes"],
    ),
    "gfn beyond 2^36": (
        """
        name = "x"
        [[setup]]
        op = "add_ram"
        gfns = "0x1000000000"
        """,
        ["setup[0]", "gfns", "0x1000000000"],
    ),
}


@pytest.mark.parametrize("case", list(OTHER_REFUSALS))
def test_other_refusals(case, tmp_path):
    text, needles = OTHER_REFUSALS[case]
    policy_error(tmp_path, text, *needles)


def test_policy_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "p.toml"
    path.write_bytes(b'name = "\xff\xfe"\n')
    check_error(["policy", "check", path], str(path))


def test_selector_error_found_on_the_trace_names_the_file(tmp_path, kernel_trace):
    # The trace's RAM ends at gfn 0xfffff, so "above RAM" + 2^36 leaves the EPT's reach. That is
    # only known once the trace is there, and the Error line must still name the policy file.
    path = write_policy(
        tmp_path,
        f"""
        name = "x"
        [[setup]]
        op = "add_ram"
        gfns = {{ above_ram = [0, {1 << 36}] }}
        """,
    )
    check_ok(path)
    check_error(
        ["policy", "check", path, "--trace", kernel_trace], str(path), "setup[0]", "above_ram"
    )


# --------------------------------------------------------------------------- accesses
WRITE_WITHOUT_READ = {
    "view default_access": (
        """
        name = "x"
        [[view]]
        name = "a"
        default_access = "{a}"
        """,
        "default_access",
    ),
    "setup access": (
        """
        name = "x"
        [[view]]
        name = "a"
        [[setup]]
        op = "set_mem_access"
        view = "a"
        gfns = [16, 31]
        access = "{a}"
        [[on_violation]]
        action = "emulate"
        """,
        "access",
    ),
    "set-access response": (
        """
        name = "x"
        [[on_violation]]
        action = "set-access"
        access = "{a}"
        """,
        "access",
    ),
    "host_access": (
        """
        name = "x"
        [domain]
        host_access = "{a}"
        """,
        "host_access",
    ),
}


@pytest.mark.parametrize("access", ["w", "wx"])
@pytest.mark.parametrize("where", list(WRITE_WITHOUT_READ))
def test_write_without_read_is_refused_as_a_misconfiguration(where, access, tmp_path):
    text, key = WRITE_WITHOUT_READ[where]
    line = policy_error(tmp_path, text.replace("{a}", access), key, f'"{access}"')
    assert "misconfiguration" in line


def test_unknown_access_suggests_the_close_one(tmp_path):
    policy_error(
        tmp_path,
        """
        name = "x"
        [[view]]
        name = "a"
        default_access = "rxw"
        """,
        "default_access",
        "rxw",
        "did you mean",
    )


# --------------------------------------------------------------------------- domain and views
def test_explicit_view_index_not_below_nr_altp2m(tmp_path):
    policy_error(
        tmp_path,
        """
        name = "x"
        [domain]
        nr_altp2m = 4
        [[view]]
        name = "a"
        index = 4
        """,
        "view[0]",
        "nr_altp2m",
        "4",
    )


def test_implicit_view_index_not_below_nr_altp2m(tmp_path):
    # nr_altp2m = 2: slots 0 (view 0) and 1; the second declared view would need slot 2
    policy_error(
        tmp_path,
        """
        name = "x"
        [domain]
        nr_altp2m = 2
        [[view]]
        name = "a"
        [[view]]
        name = "b"
        """,
        "view[1]",
        "nr_altp2m",
    )


def test_highest_view_index_below_nr_altp2m_is_fine(tmp_path):
    check_ok(
        write_policy(
            tmp_path,
            """
        name = "x"
        [domain]
        nr_altp2m = 4
        [[view]]
        name = "a"
        index = 3
        """,
        )
    )


@pytest.mark.parametrize(
    ("xen", "nr", "ok"),
    [
        ("4.20", 10, True),
        ("4.20", 11, False),
        ("4.21", 512, True),
        ("4.22", 512, True),
        ("4.22", 513, False),
        ("4.22", 0, False),
    ],
)
def test_nr_altp2m_limit_depends_on_xen(xen, nr, ok, tmp_path):
    text = f'name = "x"\n[domain]\nxen = "{xen}"\nnr_altp2m = {nr}\n'
    if ok:
        check_ok(write_policy(tmp_path, text))
    else:
        policy_error(tmp_path, text, "nr_altp2m", str(nr))


@pytest.mark.parametrize(
    ("order", "ok"), [(0, True), (9, True), (18, True), (5, False), (12, False)]
)
def test_host_order(order, ok, tmp_path):
    text = f'name = "x"\n[domain]\nhost_order = {order}\n'
    if ok:
        check_ok(write_policy(tmp_path, text))
    else:
        policy_error(tmp_path, text, "host_order", str(order))


def test_two_views_with_the_same_explicit_index(tmp_path):
    policy_error(
        tmp_path,
        """
        name = "x"
        [[view]]
        name = "a"
        index = 3
        [[view]]
        name = "b"
        index = 3
        """,
        "view[1]",
        "index",
        "3",
    )


def test_views_need_altp2m(tmp_path):
    policy_error(
        tmp_path,
        """
        name = "x"
        [domain]
        altp2m = false
        [[view]]
        name = "a"
        """,
        "view",
        "altp2m",
    )


@pytest.mark.parametrize("action", ["step", "switch"])
def test_view_switching_responses_need_altp2m(action, tmp_path):
    policy_error(
        tmp_path,
        f'''
        name = "x"
        [domain]
        altp2m = false
        [[on_violation]]
        action = "{action}"
        to = 0
        ''',
        "on_violation[0]",
        f'"{action}"',
        "altp2m",
    )


@pytest.mark.parametrize("action", ["step", "switch"])
def test_response_to_the_view_it_filters_on(action, tmp_path):
    policy_error(
        tmp_path,
        f'''
        name = "x"
        [[view]]
        name = "a"
        default_access = "rx"
        [[on_violation]]
        view = "a"
        action = "{action}"
        to = "a"
        ''',
        "on_violation[0]",
        '"to"',
    )


def test_on_ve_without_enable_notify(tmp_path):
    policy_error(
        tmp_path,
        """
        name = "x"
        [[view]]
        name = "a"
        [on_ve]
        action = "vmfunc-step"
        to = "a"
        """,
        "[on_ve]",
        "enable_notify",
    )


def test_on_ve_vmfunc_to_a_view_made_invisible(tmp_path):
    policy_error(
        tmp_path,
        """
        name = "x"
        [[view]]
        name = "a"
        [[setup]]
        op = "enable_notify"
        vcpus = "all"
        [[setup]]
        op = "set_visibility"
        view = "a"
        visible = false
        [on_ve]
        action = "vmfunc-switch"
        to = "a"
        """,
        "[on_ve]",
        "invisible",
    )


def test_on_ve_vmfunc_to_a_view_made_visible_again_is_fine(tmp_path):
    check_ok(
        write_policy(
            tmp_path,
            """
        name = "x"
        [[view]]
        name = "a"
        visible = false
        [[setup]]
        op = "enable_notify"
        vcpus = [0, 1]
        [[setup]]
        op = "set_visibility"
        view = "a"
        visible = true
        [on_ve]
        action = "vmfunc-step"
        to = "a"
        """,
        )
    )


def test_switch_p2m_to_a_view_declared_invisible(tmp_path):
    policy_error(
        tmp_path,
        """
        name = "x"
        [[view]]
        name = "a"
        visible = false
        [[setup]]
        op = "switch_p2m"
        view = "a"
        """,
        "setup[0]",
        "switch_p2m",
        "invisible",
    )


def test_switch_p2m_to_a_view_made_invisible(tmp_path):
    policy_error(
        tmp_path,
        """
        name = "x"
        [[view]]
        name = "a"
        [[setup]]
        op = "set_visibility"
        view = "a"
        visible = false
        [[setup]]
        op = "switch_p2m"
        view = "a"
        """,
        "setup[1]",
        "switch_p2m",
        "invisible",
    )


@pytest.mark.parametrize(("xen", "ok"), [("4.13", False), ("4.14", True)])
def test_fast_single_step_needs_xen_4_14(xen, ok, tmp_path):
    text = f'''
        name = "x"
        [domain]
        xen = "{xen}"
        [[view]]
        name = "a"
        default_access = "rx"
        [[on_violation]]
        view = "a"
        action = "step"
        to = 0
        fast = true
        '''
    if ok:
        check_ok(write_policy(tmp_path, text))
    else:
        policy_error(tmp_path, text, "on_violation[0]", "fast", "4.14")


def test_coverage_gap_is_refused_by_policy_check(tmp_path):
    # view "a" is read-only: writes and fetches fault there, but only fetches have a rule
    policy_error(
        tmp_path,
        """
        name = "x"
        [[view]]
        name = "a"
        default_access = "r"
        [[on_violation]]
        kind = "x"
        action = "step"
        to = 0
        """,
        "'w'",
        "'a'",
        "on_violation",
    )


def test_coverage_gap_without_any_rule(tmp_path):
    policy_error(
        tmp_path,
        """
        name = "x"
        [[view]]
        name = "a"
        default_access = "rx"
        """,
        "'w'",
        "'a'",
    )


VIEW0_REACH = """
    name = "x"
    [domain]
    ram = [[0, 1023]]
    xen = "{xen}"
    [[view]]
    name = "a"
    default_access = "rwx"
    {earlier}
    [[setup]]
    op = "set_mem_access"
    view = 0
    gfns = 5
    access = "r"
    [[on_violation]]
    view = "a"
    kind = "x"
    action = "step"
    to = 0
    """
A_TOUCHES_5 = (
    '[[setup]]\n    op = "set_mem_access"\n    view = "a"\n    gfns = 5\n    access = "rwx"'
)


@pytest.mark.parametrize(
    ("xen", "earlier", "gap_in"),
    [
        # SPEC §4: before 4.19 lazy copies take the host entry's access, so the view-0 "r"
        # reaches view 0 and view "a" alike: writes can fault in both, view 0 first
        ("4.18", "", "'0'"),
        # from 4.19 views copy with their own default: nothing holds gfn 5 when the host
        # entry changes, so the restriction reaches no view and no rule is needed
        ("4.19", "", None),
        # ... unless an earlier op put gfn 5 into view "a" (prepopulate), where the host
        # change propagates: a write can fault in "a"
        ("4.22", A_TOUCHES_5, "'a'"),
    ],
)
def test_a_view0_restriction_needs_rules_only_where_it_can_reach(tmp_path, xen, earlier, gap_in):
    text = VIEW0_REACH.format(xen=xen, earlier=earlier)
    if gap_in is None:
        check_ok(write_policy(tmp_path, text))
    else:
        policy_error(tmp_path, text, "'w'", gap_in, "on_violation")


def test_rule_covering_only_some_gfns_is_a_warning(tmp_path):
    result = check_ok(
        write_policy(
            tmp_path,
            """
        name = "x"
        [[view]]
        name = "a"
        default_access = "rx"
        [[on_violation]]
        kind = "w"
        gfns = [0x100, 0x1ff]
        action = "step"
        """,
        )
    )
    (warning,) = warnings_of(result)
    assert "'w'" in warning and "'a'" in warning


# --------------------------------------------------------------------------- gfn selectors
def _selector_policy(gfns: str) -> str:
    return f"""
        name = "x"
        [[view]]
        name = "a"
        [[setup]]
        op = "set_mem_access"
        view = "a"
        gfns = {gfns}
        access = "rx"
        [[on_violation]]
        action = "emulate"
        """


def test_gfn_selector_with_a_bad_hex_string(tmp_path):
    policy_error(tmp_path, _selector_policy('"0x1fzz"'), "setup[0]", "gfns", "0x1fzz")


@pytest.mark.parametrize("gfns", ["[5, 3]", '["0x5", "0x3"]', "[[1, 2], [9, 8]]"])
def test_gfn_range_with_first_above_last(gfns, tmp_path):
    policy_error(tmp_path, _selector_policy(gfns), "setup[0]", "gfns")


@pytest.mark.parametrize(
    "gfns",
    [
        '"0x1f000"',
        "[16, 31]",
        '["0x10", "0x1f"]',
        '[[1, 2], 7, "0x20"]',
        '{ set = "executed", top = 8 }',
        '{ set = "meta:kernel_code" }',
    ],
)
def test_good_gfn_selectors(gfns, tmp_path, kernel_trace):
    check_ok(write_policy(tmp_path, _selector_policy(gfns)), "--trace", kernel_trace)


def test_selector_set_name_with_did_you_mean(tmp_path):
    policy_error(
        tmp_path,
        _selector_policy('{ set = "exectued" }'),
        "setup[0]",
        "exectued",
        'did you mean "executed"',
    )


def test_meta_set_the_trace_lacks_is_empty_with_a_warning(tmp_path, kernel_trace):
    result = check_ok(
        write_policy(tmp_path, _selector_policy('{ set = "meta:no_such_set" }')),
        "--trace",
        kernel_trace,
    )
    assert any("no_such_set" in w for w in warnings_of(result)), result.stderr


def test_change_gfn_of_a_gfn_outside_ram_is_refused_on_the_trace(tmp_path, kernel_trace):
    # the generated trace's metadata says RAM is gfns 0 - 0xfffff
    path = write_policy(
        tmp_path,
        """
        name = "x"
        [[view]]
        name = "a"
        [[setup]]
        op = "change_gfn"
        view = "a"
        old = "0x200000"
        new = "0x10"
        """,
    )
    check_ok(path)  # nothing wrong without a trace
    check_error(
        ["policy", "check", path, "--trace", kernel_trace], str(path), "setup[0]", "0x200000"
    )


def test_policy_check_with_a_missing_trace(tmp_path):
    trace = tmp_path / "missing.parquet"
    check_error(["policy", "check", "baseline", "--trace", trace], "missing.parquet")


# --------------------------------------------------------------------------- warnings
VIEW0_RESTRICTION = """
    name = "x"
    [domain]
    xen = "{xen}"
    [[setup]]
    op = "set_mem_access"
    view = 0
    gfns = [0x1000, 0x10ff]
    access = "rx"
    [[on_violation]]
    action = "emulate"
    """


def test_view0_set_mem_access_with_altp2m_warns_about_the_lazy_copy(tmp_path, kernel_trace):
    path = write_policy(tmp_path, VIEW0_RESTRICTION.replace("{xen}", "4.22"))
    for args in ([path], [path, "--trace", kernel_trace]):
        result = check_ok(*args)
        warnings = [w for w in warnings_of(result) if "setup[0]" in w]
        assert len(warnings) == 1, result.stderr
        text = warnings[0].lower()
        assert "view-0" in text or "view 0" in text
        assert "lazy" in text or "cop" in text, warnings[0]
        assert "lost" in text


def test_view0_set_mem_access_before_xen_4_19_keeps_the_restriction(tmp_path):
    # before 4.19 a lazy copy takes the host entry's access: nothing is lost, nothing to warn
    result = check_ok(write_policy(tmp_path, VIEW0_RESTRICTION.replace("{xen}", "4.18")))
    assert warnings_of(result) == []


def test_view0_set_mem_access_without_altp2m_does_not_warn():
    result = check_ok("memaccess-write")
    assert warnings_of(result) == []


def test_view0_set_suppress_ve_warns(tmp_path):
    result = check_ok(
        write_policy(
            tmp_path,
            """
        name = "x"
        [[setup]]
        op = "set_suppress_ve"
        view = 0
        gfns = [0x1000, 0x1003]
        suppress = false
        """,
        )
    )
    warnings = warnings_of(result)
    assert len(warnings) == 1 and "setup[0]" in warnings[0] and "set_suppress_ve" in warnings[0]


# --------------------------------------------------------------------------- Revision 2 sections (§4, §6.4, §6.5)
BP_POLICY = """
name = "bp"
[[view]]
name = "x"
[breakpoints]
at = [0x5010, {{ ip = ["0xffffffff81000010"] }}]
[[setup]]
op = "change_gfn"
view = "x"
old = 5
new = 600
[[setup]]
op = "write_breakpoints"
view = "{writer}"
[on_breakpoint]
action = "step"
to = {to}
"""


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        (
            'name = "p"\n[breakpoints]\nat = 1\nwhere = 2\n[on_breakpoint]\naction = "emulate"\n',
            ['[breakpoints]: unknown key "where"'],
        ),
        ('name = "p"\n[breakpoints]\nat = 1\n', ["needs [on_breakpoint]"]),
        ('name = "p"\n[on_breakpoint]\naction = "emulate"\n', ["no [breakpoints] to answer"]),
        (
            'name = "p"\n[breakpoints]\nat = 1\n[on_breakpoint]\naction = "stepp"\n',
            ['"step" or "emulate"', "did you mean"],
        ),
        (
            'name = "p"\n[domain]\nmonitor = false\n[breakpoints]\nat = 1\n[on_breakpoint]\naction = "emulate"\n',
            ["monitor = false"],
        ),
        (
            'name = "p"\n[breakpoints]\nat = [{ ip = ["zz"] }]\n[on_breakpoint]\naction = "emulate"\n',
            ["'zz'"],
        ),
        (
            'name = "p"\n[on_cr3]\nsync = false\n[[on_cr3.switch]]\ncr3 = 1\nto = 0\n',
            ["needs sync = true"],
        ),
        (
            'name = "p"\n[on_cr3]\n[[on_cr3.switch]]\ncr3 = "proc:bash"\nto = 0\n',
            ['"process:NAME"'],
        ),
    ],
)
def test_revision2_sections_refuse_what_they_must(tmp_path, body, needles):
    check_error(["policy", "check", write_policy(tmp_path, body)], *needles)


def test_breakpoint_step_into_a_view_showing_the_int3_is_refused(tmp_path, kernel_trace):
    # The INT3 at 0x5010 is written into x's frame for gfn 5, which x remapped to 600's frame.
    # Stepping into view 0 (which shows the original frame 5) is the working form; stepping
    # into x itself would trap at every restart (SPEC §6.4). The generated trace has ip, so
    # its instructions have byte addresses.
    ok = write_policy(tmp_path, BP_POLICY.format(writer="x", to=0), "ok.toml")
    check_ok(ok, "--trace", kernel_trace)
    bad = write_policy(tmp_path, BP_POLICY.format(writer="x", to='"x"'), "bad.toml")
    check_error(["policy", "check", bad, "--trace", kernel_trace], "[on_breakpoint]", "trap again")
    # written into view 0's own frame (no remap there): every view without a remap shows it
    bad0 = write_policy(
        tmp_path, BP_POLICY.format(writer="0", to=0).replace('view = "0"', "view = 0"), "bad0.toml"
    )
    check_error(["policy", "check", bad0, "--trace", kernel_trace], "trap again")


def test_breakpoints_need_a_trace_with_byte_addresses(tmp_path):
    import polars as pl

    trace = tmp_path / "plain.parquet"  # gfn and access only: no gpa, no ip
    pl.DataFrame({"gfn": [5, 6], "access": [4, 1]}).cast(
        {"gfn": pl.UInt64, "access": pl.UInt8}
    ).write_parquet(trace)
    policy = write_policy(tmp_path, BP_POLICY.format(writer="x", to=0))
    check_error(["policy", "check", policy, "--trace", trace], "byte addresses")


def test_a_reader_that_goes_away_stops_the_listing_quietly():
    """``policy list | head -1``: once the reader has gone, the listing stops with the shell's
    SIGPIPE code and no error text (the reader closes its end before the CLI writes)."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "altp2m_replay", "policy", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141, err
    assert err == b""
