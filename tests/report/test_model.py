import pytest

from fedsilo.report import SiteRow, UpdateRow
from tests.report.conftest import make_report_data


def test_passing_verification_with_problems_is_refused() -> None:
    with pytest.raises(ValueError, match="problem"):
        make_report_data(verify_ok=True, problems=("entry 3: bad signature",))


def test_failing_verification_may_list_problems() -> None:
    data = make_report_data(verify_ok=False, problems=("entry 3: bad signature",))

    assert data.verification.problems == ("entry 3: bad signature",)


def test_negative_site_count_is_refused_with_site_name() -> None:
    with pytest.raises(ValueError, match="st-mary"):
        SiteRow(name="st-mary", fingerprint="fp", accepted=-1, rejected=0)


def test_negative_update_size_is_refused_with_site_and_round() -> None:
    with pytest.raises(ValueError, match=r"'st-mary' in round 3"):
        UpdateRow(round=3, site="st-mary", accepted=True, detail="d", size_bytes=-5)


def test_epsilon_is_a_read_only_copy() -> None:
    epsilon = {"st-mary": ((1, 0.5),)}
    data = make_report_data(epsilon=epsilon)

    epsilon["late"] = ((1, 9.0),)

    assert list(data.privacy.epsilon) == ["st-mary"]
    with pytest.raises(TypeError):
        data.privacy.epsilon["other"] = ()  # type: ignore[index]
