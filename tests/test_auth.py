import pytest

from pulldocker.auth import Challenge, parse_challenges


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        pytest.param(
            ['Bearer realm="https://a/token",service="reg"'],
            [Challenge("bearer", {"realm": "https://a/token", "service": "reg"})],
            id="bearer",
        ),
        pytest.param(
            ['bearer realm="r",scope="repository:a/b:pull,push"'],
            [Challenge("bearer", {"realm": "r", "scope": "repository:a/b:pull,push"})],
            id="quoted-comma",
        ),
        pytest.param(
            ['Basic realm="x", Bearer realm="y",service=s'],
            [
                Challenge("basic", {"realm": "x"}),
                Challenge("bearer", {"realm": "y", "service": "s"}),
            ],
            id="two-in-one-line",
        ),
        pytest.param(
            ['Basic realm="x"', 'Bearer realm="y"'],
            [Challenge("basic", {"realm": "x"}), Challenge("bearer", {"realm": "y"})],
            id="two-lines",
        ),
        pytest.param(
            ['Bearer REALM = "a\\"b" , Error="invalid_token"'],
            [Challenge("bearer", {"realm": 'a"b', "error": "invalid_token"})],
            id="escapes-and-case",
        ),
        pytest.param(
            ['Bearer realm="r",scope="repository:h:5000/a:pull repository:b:pull"'],
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "r",
                        "scope": "repository:h:5000/a:pull repository:b:pull",
                    },
                )
            ],
            id="scope-list",
        ),
        pytest.param([""], [], id="empty"),
    ],
)
def test_parse_challenges(lines: list[str], expected: list[Challenge]) -> None:
    assert parse_challenges(lines) == expected


def test_challenge_scopes_split_on_spaces() -> None:
    challenge = parse_challenges(['Bearer scope="a:b:pull c:d:pull"'])[0]
    assert challenge.scopes == ("a:b:pull", "c:d:pull")
