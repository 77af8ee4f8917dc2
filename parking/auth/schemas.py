from typing import Literal

from pydantic import BaseModel, Field

# Mainland mobile numbers, optionally with +86.
Phone = Field(pattern=r"^(\+86)?1[3-9]\d{9}$")


class CodeRequest(BaseModel):
    phone: str = Phone


class CodeSent(BaseModel):
    expires_in: int
    # Send it with the code (CodeGrant): the code's wrong guesses count against it alone.
    challenge_id: str


class CodeGrant(BaseModel):
    grant_type: Literal["sign_in_code"]
    phone: str = Phone
    code: str = Field(pattern=r"^\d{6}$")
    # The `challenge_id` the code's request was answered with (TokenSigner.code_challenge).
    challenge_id: str = Field(max_length=48, pattern=r"^ch_[1-9][0-9]{0,18}\.[A-Za-z0-9_-]{22}$")


class RefreshGrant(BaseModel):
    grant_type: Literal["refresh_token"]
    refresh_token: str = Field(min_length=20, max_length=200)


class PasswordGrant(BaseModel):
    grant_type: Literal["password"]
    email: str = Field(min_length=3, max_length=200, pattern=r"^[^\s\x00@]+@[^\s\x00@]+$")
    password: str = Field(min_length=1, max_length=200)
    # The `device_token` an earlier sign-in of this e-mail gave this browser: guesses by others
    # at the e-mail do not make its owner wait (service.sign_in_with_password).
    device_token: str | None = Field(default=None, max_length=1000)


class TokenPair(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    refresh_token: str
    # Password sign-ins only: keep it and send it with the next password sign-in.
    device_token: str | None = None


class Logout(BaseModel):
    refresh_token: str = Field(min_length=20, max_length=200)


class PasswordChange(BaseModel):
    current_password: str = Field(min_length=1, max_length=200)
    # Long rather than clever: a passphrase of four words passes, "Passw0rd!" does not.
    new_password: str = Field(min_length=12, max_length=200)
