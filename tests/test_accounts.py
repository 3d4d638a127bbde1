"""Sign-up policy, the first superuser, login throttling, admin access."""

from __future__ import annotations

import threading

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client

from chat import services

pytestmark = pytest.mark.django_db

User = get_user_model()
PASSWORD = "correct-horse-battery-9"


def _signup(client: Client, username: str):
    return client.post(
        "/accounts/signup/",
        {"username": username, "password1": PASSWORD, "password2": PASSWORD},
    )


def test_first_signup_becomes_superuser_and_is_logged_in(client):
    response = _signup(client, "root")
    assert response.status_code == 302
    user = User.objects.get(username="root")
    assert user.is_superuser and user.is_staff and user.is_active
    assert client.get("/").status_code == 200


def test_signup_closed_after_first_user(client):
    _signup(client, "root")
    other = Client()
    response = _signup(other, "second")
    assert response.status_code == 403
    assert not User.objects.filter(username="second").exists()
    assert other.get("/accounts/signup/").status_code == 403


@pytest.mark.parametrize("superuser", [True, False])
def test_a_site_set_up_with_createsuperuser_is_not_fresh(client, django_user_model, superuser):
    # Only sign-up makes the SiteOwner row: a site whose accounts came from
    # `createsuperuser` (the README's way) or the admin offered its first
    # stranger the administrator's account.
    if superuser:
        django_user_model.objects.create_superuser("boss", password=PASSWORD)
    else:
        django_user_model.objects.create_user("bob", password=PASSWORD)
    page = client.get("/accounts/signup/")
    assert page.status_code == 403
    assert b"first account becomes" not in page.content
    response = client.post(
        "/accounts/signup/",
        {"username": "mallory", "password1": PASSWORD, "password2": PASSWORD},
    )
    assert response.status_code == 403
    assert not django_user_model.objects.filter(username="mallory").exists()
    with pytest.raises(services.SignupClosed):
        services.user_signup(username="eve", password=PASSWORD)


def test_signup_open_mode_creates_normal_users(client, settings):
    settings.SIGNUP_MODE = "open"
    _signup(client, "root")
    response = _signup(Client(), "second")
    assert response.status_code == 302
    second = User.objects.get(username="second")
    assert second.is_active and not second.is_staff and not second.is_superuser


def test_signup_approval_mode_waits_for_admin(client, settings):
    settings.SIGNUP_MODE = "approval"
    _signup(client, "root")
    other = Client()
    response = _signup(other, "second")
    assert response.status_code == 200
    assert b"approval" in response.content
    assert not User.objects.get(username="second").is_active
    assert not other.login(username="second", password=PASSWORD)


@pytest.mark.django_db(transaction=True)
def test_two_simultaneous_first_signups_make_one_superuser():
    barrier = threading.Barrier(2)
    results = []

    def attempt(name):
        barrier.wait()
        try:
            services.user_signup(username=name, password=PASSWORD)
            results.append(name)
        except services.SignupClosed:
            results.append(None)
        finally:
            connection.close()

    threads = [threading.Thread(target=attempt, args=(n,)) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert User.objects.filter(is_superuser=True).count() == 1
    assert User.objects.count() == 1
    assert sorted(results, key=str) == sorted([None, User.objects.get().username], key=str)


def test_login_throttled_after_repeated_failures(client, user, settings):
    settings.LOGIN_FAILURE_LIMIT = 3
    for _ in range(3):
        response = client.post("/accounts/login/", {"username": "alice", "password": "wrong"})
        assert b"correct username and password" in response.content
    # Now even the right password is refused, with the throttle message.
    response = client.post("/accounts/login/", {"username": "alice", "password": "pw-alice-123!"})
    assert b"Too many failed sign-in attempts" in response.content
    assert "_auth_user_id" not in client.session


def test_login_same_answer_for_unknown_user_and_wrong_password(client, user):
    unknown = client.post("/accounts/login/", {"username": "nobody", "password": "x"})
    wrong = client.post("/accounts/login/", {"username": "alice", "password": "x"})
    assert unknown.status_code == wrong.status_code == 200
    assert unknown.context["form"].errors == wrong.context["form"].errors


@pytest.mark.parametrize("path", ["/accounts/login/", "/admin/login/"])
def test_look_alike_spellings_of_a_username_share_its_throttle(
    client, settings, path, django_user_model
):
    # Django signs "\uff41lice" (fullwidth a), " alice " and "ALICE"-folded spellings
    # in as the NFKC form; each spelling must not get an allowance of its own.
    settings.LOGIN_FAILURE_LIMIT = 3
    django_user_model.objects.create_superuser("alice", password=PASSWORD)
    for spelling in ("alice", "\uff41lice", "ALICE"):
        client.post(path, {"username": spelling, "password": "wrong"})
    for spelling in ("\uff41lice", "\uff41\uff4c\uff49\uff43\uff45", " alice"):
        response = client.post(path, {"username": spelling, "password": PASSWORD})
        assert b"Too many failed sign-in attempts" in response.content, spelling
        assert "_auth_user_id" not in client.session


def test_a_blank_password_does_not_reset_the_throttle(client, user, settings):
    settings.LOGIN_FAILURE_LIMIT = 3
    for _ in range(4):
        client.post("/accounts/login/", {"username": "alice", "password": "wrong"})
        client.post("/accounts/login/", {"username": "alice", "password": ""})
    response = client.post("/accounts/login/", {"username": "alice", "password": "pw-alice-123!"})
    assert b"Too many failed sign-in attempts" in response.content
    assert "_auth_user_id" not in client.session


def test_admin_login_is_throttled_too(client, settings, django_user_model):
    settings.LOGIN_FAILURE_LIMIT = 2
    django_user_model.objects.create_superuser("boss", password=PASSWORD)
    for _ in range(2):
        client.post("/admin/login/", {"username": "boss", "password": "wrong"})
    response = client.post("/admin/login/?next=/admin/", {"username": "boss", "password": PASSWORD})
    assert response.status_code == 200
    assert b"Too many failed sign-in attempts" in response.content


def test_createsuperuser_noinput_with_environment(monkeypatch):
    from django.core.management import call_command

    monkeypatch.setenv("DJANGO_SUPERUSER_USERNAME", "ops")
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", PASSWORD)
    monkeypatch.setenv("DJANGO_SUPERUSER_EMAIL", "ops@example.com")
    call_command("createsuperuser", "--noinput")
    assert User.objects.get(username="ops").is_superuser


def test_logout_is_post_only(client, user):
    client.force_login(user)
    assert client.get("/accounts/logout/").status_code == 405
    assert client.post("/accounts/logout/").status_code == 302
    assert client.get("/").status_code == 302


def test_other_addresses_failures_do_not_lock_a_user_out(user, settings):
    settings.LOGIN_FAILURE_LIMIT = 2
    attacker = Client(REMOTE_ADDR="203.0.113.9")
    for _ in range(3):
        attacker.post("/accounts/login/", {"username": "alice", "password": "wrong"})
    owner = Client(REMOTE_ADDR="198.51.100.7")
    response = owner.post("/accounts/login/", {"username": "alice", "password": "pw-alice-123!"})
    assert response.status_code == 302


def test_many_addresses_guessing_one_account_are_throttled(user, settings):
    settings.LOGIN_FAILURE_LIMIT = 2
    for i in range(20):  # ten times the limit, from as many addresses
        Client(REMOTE_ADDR=f"203.0.113.{i}").post(
            "/accounts/login/", {"username": "alice", "password": "wrong"}
        )
    response = Client(REMOTE_ADDR="198.51.100.7").post(
        "/accounts/login/", {"username": "alice", "password": "pw-alice-123!"}
    )
    assert b"Too many failed sign-in attempts" in response.content


def test_client_address_header_behind_a_proxy(user, settings):
    settings.LOGIN_FAILURE_LIMIT = 2
    settings.CHAT_CLIENT_IP_HEADER = "HTTP_X_REAL_IP"
    for _ in range(2):
        Client(REMOTE_ADDR="127.0.0.1", HTTP_X_REAL_IP="203.0.113.9").post(
            "/accounts/login/", {"username": "alice", "password": "wrong"}
        )
    other = Client(REMOTE_ADDR="127.0.0.1", HTTP_X_REAL_IP="198.51.100.7")
    response = other.post("/accounts/login/", {"username": "alice", "password": "pw-alice-123!"})
    assert response.status_code == 302
