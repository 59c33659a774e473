"""The 2.8.1 configuration format and phase 8's lossless conversion (config.configconvert)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.config import configformat, policy, store
from appliance.config.configconvert import (
    ConfigConvertError,
    config_convert,
    config_format,
    config_path,
    config_revert,
    convert_files,
)
from appliance.config.configformat import (
    CONFIG_FILE,
    LEGACY_FILES,
    LEGACY_MAIL_POLICY,
    LEGACY_POLICY_OBJECTS,
    LEGACY_SMTP,
    parse_config,
)
from appliance.config.mailpolicy import MailPolicy, PolicyRule
from appliance.config.policy import PolicyObject
from appliance.config.store import (
    file_macro_objects,
    list_policy_objects,
    read_mail_policy,
    read_smtp_settings,
    write_mail_policy,
    write_smtp_settings,
)
from appliance.system.errors import (
    ApplianceError,
    ApplianceNotInitialized,
    MalformedApplianceFile,
    UnsafeXMLError,
)
from appliance.system.paths import layout
from smtp.engine import PolicyCache, check_recipient, compile_policy

STAFF = "bob.meyer@example.com"
BLOCKED = "offers@promo-deals.test"  # on the demo's $(FILE) "Blocked senders" list


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under the root by relative path (the message store too: it must not change)."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def legacy_files(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in LEGACY_FILES if (root / name).exists()}


def configuration(root: Path) -> tuple[object, ...]:
    """What the rest of the console sees, through the unchanged public readers."""
    return (list_policy_objects(root), read_mail_policy(root), read_smtp_settings(root))


def list_files(root: Path) -> dict[str, bytes]:
    return {
        obj.file_path: policy.object_file(obj, root).read_bytes()
        for obj in file_macro_objects(root)
        if obj.file_path
    }


# --- Converting the demo appliance -------------------------------------------------------------


def test_the_demo_configuration_converts_with_every_object_rule_and_setting_equal(
    demo_appliance: Path,
) -> None:
    before = configuration(demo_appliance)
    assert config_format() == "2.8.0"

    result = config_convert()

    assert config_format() == "2.8.1"
    assert configuration(demo_appliance) == before
    objects, mail_policy, _ = before
    assert result.source_format == "2.8.0"
    assert result.objects == len(objects) == 12
    assert result.rules == len(mail_policy.rules) == 5
    assert result.quarantines == 3
    assert result.settings == 6
    assert result.files_missing == ()
    for name in LEGACY_FILES:
        assert not (demo_appliance / name).exists()
    assert sorted(p.name for p in layout().cpe_dir.iterdir()) == ["mailsec_config2_0.xml"]


def test_the_file_lists_are_carried_byte_identical_and_referenced_with_their_sha256(
    demo_appliance: Path,
) -> None:
    lists_before = list_files(demo_appliance)
    assert len(lists_before) == 3

    result = config_convert()

    assert list_files(demo_appliance) == lists_before
    carried = {item.path: item for item in result.files_carried}
    assert set(carried) == set(lists_before)
    for path, data in lists_before.items():
        assert carried[path].sha256 == hashlib.sha256(data).hexdigest()
        assert carried[path].size == len(data)
    refs = dict(parse_config(config_path().read_bytes()).file_refs)
    assert refs == {path: hashlib.sha256(data).hexdigest() for path, data in lists_before.items()}
    text = config_path().read_text()
    assert '<fileRef path="/etc/mailsec/lists/blocked_senders.txt" sha256=' in text
    assert "JChGSUxFL" not in text  # values are plain text now, not base64


def test_the_new_format_differs_in_structure_from_the_old(demo_appliance: Path) -> None:
    config_convert()
    data = config_path().read_bytes()
    assert data.startswith(b"<?xml")
    assert b'<mailsecConfig formatVersion="2.8.1" convertedFrom="2.8.0">' in data
    for section in (b"<policyObjects>", b"<mailPolicy>", b"<smtp>", b"<listenPort>25<"):
        assert section in data
    assert b"Spam phrases" in data and b"you have won\nlimited offer" in data


def test_converting_twice_is_a_no_op_with_the_same_result(demo_appliance: Path) -> None:
    first = config_convert()
    after_first = snapshot(demo_appliance)

    second = config_convert()

    assert second == first
    assert snapshot(demo_appliance) == after_first


def test_a_crash_after_the_new_file_is_written_is_finished_by_a_rerun(
    demo_appliance: Path,
) -> None:
    before = configuration(demo_appliance)
    # The state a crash leaves between "2.8.1 file renamed into place" and "2.8.0 files removed".
    converted = convert_files(
        legacy_files(demo_appliance) | list_files_rel(demo_appliance), "2.8.0"
    )
    config_path().write_bytes(converted[CONFIG_FILE])
    assert all((demo_appliance / name).exists() for name in LEGACY_FILES)
    # Readers already use the complete 2.8.1 file.
    assert config_format() == "2.8.1"
    assert configuration(demo_appliance) == before

    result = config_convert()

    assert result.source_format == "2.8.0" and result.objects == 12
    assert not any((demo_appliance / name).exists() for name in LEGACY_FILES)
    assert configuration(demo_appliance) == before


def test_a_killed_conversion_leaves_old_or_new_and_a_rerun_completes(
    demo_appliance: Path,
) -> None:
    """SIGKILL a process converting in a loop at a random moment, again and again."""
    before = configuration(demo_appliance)
    originals = legacy_files(demo_appliance)
    script = (
        "import os, sys, django\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'lmi.settings')\n"
        "django.setup()\n"
        "from pathlib import Path\n"
        "from appliance.config.configconvert import config_convert, config_revert\n"
        "root = Path(sys.argv[1])\n"
        "saved = {n: (root / n).read_bytes() for n in sys.argv[2:]}\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    config_convert(root)\n"
        "    config_revert(saved, root)\n"
    )
    for delay in (0.05, 0.11, 0.17):
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(demo_appliance), *originals],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        state = configuration(demo_appliance)
        assert state == before  # old or new format, never a third state
        config_convert()
        assert configuration(demo_appliance) == before
        config_revert(originals)
        assert legacy_files(demo_appliance) == originals
        assert not config_path().exists()


def list_files_rel(root: Path) -> dict[str, bytes]:
    return {path.lstrip("/"): data for path, data in list_files(root).items()}


# --- Reading and writing after the conversion --------------------------------------------------


def test_writes_after_the_conversion_go_to_the_new_file(demo_appliance: Path) -> None:
    config_convert()
    smtp = read_smtp_settings()
    smtp.next_hop = "relay.example.com"
    smtp.smtp_log_retention_days = 30
    write_smtp_settings(smtp)
    objects = list_policy_objects()
    odd = PolicyObject("test-odd", "Odd\tvalue", "keywordlist", "a\r\nb \x01 <&>]]> é\n")
    store.write_policy_objects([*objects, odd])
    current = read_mail_policy()
    updated = MailPolicy(
        (*current.rules, PolicyRule("spam-keywords", "test-odd", threshold=4.123456789)),
        current.quarantine,
    )
    write_mail_policy(updated)

    assert config_format() == "2.8.1"
    assert sorted(p.name for p in layout().cpe_dir.iterdir()) == ["mailsec_config2_0.xml"]
    assert read_smtp_settings() == smtp
    assert list_policy_objects() == [*objects, odd]
    assert read_mail_policy() == updated
    assert read_mail_policy().rules[-1].threshold == 4.123456789


def test_saving_unchanged_configuration_keeps_the_new_file_byte_identical(
    demo_appliance: Path,
) -> None:
    config_convert()
    data = config_path().read_bytes()

    store.write_policy_objects(list_policy_objects())
    write_smtp_settings(read_smtp_settings())
    write_mail_policy(read_mail_policy())

    assert config_path().read_bytes() == data


def test_a_write_keeps_the_validation_of_the_old_format(demo_appliance: Path) -> None:
    config_convert()
    data = config_path().read_bytes()
    objects = list_policy_objects()
    smtp = read_smtp_settings()
    smtp.listen_port = 70000

    with pytest.raises(ValueError, match="duplicate"):
        store.write_policy_objects([*objects, objects[0]])
    with pytest.raises(ValueError, match="listen_port"):
        write_smtp_settings(smtp)
    with pytest.raises(ValueError, match="no policy object"):
        write_mail_policy(MailPolicy((PolicyRule("sender-block", "nope"),)))

    assert config_path().read_bytes() == data


def test_the_smtp_engine_applies_the_file_block_list_after_the_conversion(
    demo_appliance: Path,
) -> None:
    cache = PolicyCache()
    before = cache.get()
    assert check_recipient(before, BLOCKED, STAFF) is not None

    config_convert()

    after = cache.get()
    assert after is not before  # the cache noticed the files changed
    assert after == before
    assert check_recipient(after, BLOCKED, STAFF) is not None
    _, read_lists = compile_policy()
    assert (
        policy.object_file({o.name: o for o in list_policy_objects()}["Blocked senders"])
        in read_lists
    )

    # An edit of the list applies without a restart, in the new format too.
    path = policy.object_file({o.name: o for o in list_policy_objects()}["Blocked senders"])
    path.write_text(path.read_text() + "new.spammer@elsewhere.test\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns()))
    assert check_recipient(cache.get(), "new.spammer@elsewhere.test", STAFF) is not None

    # And an edit of the configuration itself (now in the 2.8.1 file) is picked up.
    write_mail_policy(MailPolicy((), read_mail_policy().quarantine))
    assert check_recipient(cache.get(), BLOCKED, STAFF) is None


def test_a_missing_section_reads_as_not_initialized_like_a_missing_file(
    demo_appliance: Path,
) -> None:
    (demo_appliance / LEGACY_MAIL_POLICY).unlink()
    result = config_convert()
    assert result.rules == 0 and result.quarantines == 0

    with pytest.raises(ApplianceNotInitialized):
        read_mail_policy()
    assert check_recipient(compile_policy()[0], BLOCKED, STAFF) is None  # as before: no rules


# --- Revert -------------------------------------------------------------------------------------


def test_revert_puts_the_old_files_back_exactly(demo_appliance: Path) -> None:
    before = snapshot(demo_appliance)
    saved = legacy_files(demo_appliance)
    config_convert()

    config_revert(saved)

    assert snapshot(demo_appliance) == before
    assert config_format() == "2.8.0"


def test_revert_without_old_files_refuses_and_changes_nothing(demo_appliance: Path) -> None:
    config_convert()
    before = snapshot(demo_appliance)

    with pytest.raises(ConfigConvertError, match=r"no 2\.8\.0 configuration"):
        config_revert({})
    with pytest.raises(ConfigConvertError):
        config_revert({"../outside.xml": b"x", LEGACY_SMTP: b"<smtp/>"})
    with pytest.raises(ApplianceError):
        config_revert({LEGACY_SMTP: b"<smtp"})

    assert snapshot(demo_appliance) == before


# --- convert_files: restoring an old backup ------------------------------------------------------


def test_convert_files_gives_what_config_convert_writes(demo_appliance: Path) -> None:
    files = legacy_files(demo_appliance) | list_files_rel(demo_appliance)
    files["etc/HOSTNAME"] = b"mailsec01\n"

    converted = convert_files(files, "2.8.0")
    config_convert()

    assert converted[CONFIG_FILE] == config_path().read_bytes()
    assert not set(LEGACY_FILES) & set(converted)
    assert converted["etc/HOSTNAME"] == b"mailsec01\n"
    for path, data in list_files_rel(demo_appliance).items():
        assert converted[path] == data


def test_convert_files_finds_lists_stored_under_files_too(demo_appliance: Path) -> None:
    files = legacy_files(demo_appliance)
    for path, data in list_files(demo_appliance).items():
        files["files" + path] = data
    refs = dict(parse_config(convert_files(files, "2.8.0")[CONFIG_FILE]).file_refs)
    assert all(digest for digest in refs.values()) and len(refs) == 3

    # Without the lists the references stay, just without a digest to check against.
    bare = convert_files(legacy_files(demo_appliance), "2.8.0")[CONFIG_FILE]
    assert set(dict(parse_config(bare).file_refs).values()) == {None}


def test_convert_files_of_the_current_format_passes_them_through(demo_appliance: Path) -> None:
    config_convert()
    files = {CONFIG_FILE: config_path().read_bytes(), "etc/HOSTNAME": b"h\n"}
    assert convert_files(files, "2.8.1") == files


def test_convert_files_is_lossless_for_awkward_values(appliance_root: Path) -> None:
    objects = [
        PolicyObject("1", "Padded macro", "keywordlist", " $(FILE/etc/x.txt)\n"),
        PolicyObject("2", "Control chars", "keywordlist", "a\x01b\x7f\r\n"),
        PolicyObject("3", "Markup <&>\"'", "keywordlist", "]]> <![CDATA[ &amp; \t\r  "),
        PolicyObject("4", "Empty", "keywordlist", ""),
        PolicyObject("5", "Unicode", "keywordlist", "Grüße 日本 🙂"),
        PolicyObject("6", "Macro", "emailaddresslist", "$(FILE/etc/mailsec/lists/a b.txt)"),
    ]
    files = {LEGACY_POLICY_OBJECTS: policy.render_policy_objects(objects)}

    converted = convert_files(files, "2.8.0")

    parsed = parse_config(converted[CONFIG_FILE])
    assert list(parsed.policy_objects or ()) == objects
    assert parsed.mail_policy is None and parsed.smtp is None
    assert parsed.file_refs == (("/etc/mailsec/lists/a b.txt", None),)


XXE = b"""<?xml version="1.0"?>
<!DOCTYPE smtp [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<smtp version="1.0"><next_hop>&xxe;</next_hop></smtp>
"""
LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;">]>
<mailpolicy version="1.0"><rule type="sender-block" object="&lol2;"/></mailpolicy>
"""


@pytest.mark.parametrize(
    ("files", "source_format", "error", "message"),
    [
        ({LEGACY_SMTP: XXE}, "2.8.0", UnsafeXMLError, "DOCTYPE"),
        ({LEGACY_MAIL_POLICY: LAUGHS}, "2.8.0", UnsafeXMLError, "DOCTYPE"),
        ({CONFIG_FILE: XXE}, "2.8.1", UnsafeXMLError, "DOCTYPE"),
        ({LEGACY_SMTP: b"<smtp><listen_port>25"}, "2.8.0", MalformedApplianceFile, "malformed"),
        ({LEGACY_SMTP: b"<smtp/>"}, "2.9.0", ConfigConvertError, "unknown configuration format"),
        (
            {LEGACY_SMTP: b"<smtp/>", CONFIG_FILE: b"<mailsecConfig/>"},
            "2.8.0",
            ConfigConvertError,
            "refusing to guess",
        ),
        (
            {
                LEGACY_POLICY_OBJECTS: b'<policyobjects><object id="1" type="x"><name>n</name>'
                b"<value>not base64!</value></object></policyobjects>"
            },
            "2.8.0",
            MalformedApplianceFile,
            "base64",
        ),
        (
            {
                LEGACY_POLICY_OBJECTS: policy.render_policy_objects(
                    [PolicyObject("1", "Escape", "domainlist", "$(FILE/etc/../../../etc/passwd)")]
                )
            },
            "2.8.0",
            ConfigConvertError,
            "outside the appliance",
        ),
        (
            {CONFIG_FILE: b'<mailsecConfig formatVersion="3.0"/>'},
            "2.8.1",
            MalformedApplianceFile,
            "not 2.8.1",
        ),
        (
            {
                CONFIG_FILE: b'<mailsecConfig formatVersion="2.8.1"><smtp><listenPort>x'
                b"</listenPort></smtp></mailsecConfig>"
            },
            "2.8.1",
            MalformedApplianceFile,
            "not a number",
        ),
    ],
)
def test_convert_files_refuses_hostile_or_inconsistent_input(
    files: dict[str, bytes], source_format: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        convert_files(files, source_format)


def test_a_hostile_file_on_disk_stops_the_conversion_and_changes_nothing(
    demo_appliance: Path,
) -> None:
    (demo_appliance / LEGACY_SMTP).write_bytes(XXE)
    before = snapshot(demo_appliance)

    with pytest.raises(UnsafeXMLError):
        config_convert()

    assert snapshot(demo_appliance) == before
    assert config_format() == "2.8.0"


def test_convert_files_without_configuration_returns_the_files_unchanged() -> None:
    files = {"etc/HOSTNAME": b"h\n"}
    assert convert_files(files, "2.8.0") == files
    assert configformat.CONFIG_FORMATS == ("2.8.0", "2.8.1")
