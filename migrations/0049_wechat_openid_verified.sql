-- A WeChat agreement's number is the driver's openid. Until the server took it from WeChat's
-- answer to the driver's sign-in code, the app named it, and anyone could name another
-- driver's: those agreements are marked unverified, and the openid's owner signing in takes
-- it over (parking.drivers.service.sign_agreement). Every agreement made from now on is
-- verified (other providers' numbers are the service's own).
ALTER TABLE pay_later_agreements ADD COLUMN identity_verified boolean NOT NULL DEFAULT true;
UPDATE pay_later_agreements SET identity_verified = false WHERE provider = 'wechat';
