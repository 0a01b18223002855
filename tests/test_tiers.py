"""The two test tiers: the kafka marker follows the fixtures, and the unit tier cannot reach a broker.

Each case runs pytest on a small test file with this suite's conftest as a plugin (pytester), so the
marking is checked on fixtures, not on a list of test names.
"""

from __future__ import annotations

import pytest

from tests.conftest import NO_BROKER

pytest_plugins = ["pytester"]

CASES = """
import pytest

@pytest.fixture
def my_broker(local_kafka):
    return local_kafka

@pytest.fixture
def my_address(kafka_bootstrap):
    return kafka_bootstrap

def test_direct(kafka_bootstrap): pass
def test_own_broker(local_kafka): pass
def test_through_a_fixture_of_a_fixture(my_broker): pass
def test_through_my_address(my_address): pass
def test_topics_on_the_broker(kafka_settings): pass
def test_a_running_ingress(ingress): pass
def test_topic_names(topics): pass
def test_plain_settings(settings): pass
def test_nothing(tmp_path): pass
@pytest.mark.kafka
def test_marked_by_hand(): pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    # Were a guard to fail, the session fixture would hand out this closed port, never start a broker.
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", NO_BROKER)
    pytester.makeconftest('pytest_plugins = ["tests.conftest"]')
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = session\n"
        "markers =\n    kafka: needs a broker\n"
    )
    return pytester


def selected(suite: pytest.Pytester, expression: str) -> set[str]:
    result = suite.runpytest("--collect-only", "-q", "-m", expression, "-p", "no:cacheprovider")
    return {line.split("::")[1] for line in result.outlines if "::" in line}


def test_every_test_whose_fixtures_reach_a_broker_is_marked_kafka(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_cases=CASES)
    kafka = {
        "test_direct",
        "test_own_broker",
        "test_through_a_fixture_of_a_fixture",
        "test_through_my_address",
        "test_topics_on_the_broker",
        "test_a_running_ingress",
        "test_topic_names",
        "test_marked_by_hand",
    }
    assert selected(suite, "kafka") == kafka
    assert selected(suite, "not kafka") == {"test_plain_settings", "test_nothing"}


def test_settings_point_at_no_broker(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_settings=f"""
        def test_plain(settings):
            assert settings.kafka_bootstrap_servers == {NO_BROKER!r}
        """
    )
    suite.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_a_unit_test_that_asks_for_the_broker_at_run_time_fails(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_sneaky="""
        def test_sneaky(request):
            request.getfixturevalue("kafka_bootstrap")

        def test_sneaky_own_broker(request):
            request.getfixturevalue("local_kafka")
        """
    )
    result = suite.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*::test_sneaky is not in the kafka tier but asked for the broker (kafka_bootstrap)*",
            "*::test_sneaky_own_broker is not in the kafka tier but asked for the broker (local_kafka)*",
        ]
    )


def test_a_kafka_test_may_ask_for_the_broker_at_run_time(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_declared=f"""
        import pytest

        @pytest.mark.kafka
        def test_declared(request):
            assert request.getfixturevalue("kafka_bootstrap") == {NO_BROKER!r}
        """
    )
    suite.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
