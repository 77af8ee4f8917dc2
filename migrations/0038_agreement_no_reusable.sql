-- On WeChat an agreement's number is the driver's openid: a driver who turns pay-later off
-- and on again signs a new agreement under the same number. Unique among active agreements
-- only (a cancelled one keeps its number for the charges made under it).
ALTER TABLE pay_later_agreements DROP CONSTRAINT pay_later_agreements_provider_agreement_no_key;
CREATE UNIQUE INDEX pay_later_active_agreement_no ON pay_later_agreements (provider, agreement_no)
    WHERE cancelled_at IS NULL;
