"""Generate holdall's three customer instruction datasets (src/holdall/data/customers/*.jsonl).

The scenario of the seed text: one base model, three clients, each wanting its own behaviour.

* Client A (``medical``): medical Q&A. House style: ``Clinical summary: ... Key point: ... This is not a
  diagnosis; consult your physician.``
* Client B (``legal``): contract-clause summarisation. House style: ``SUMMARY: ... | OBLIGATIONS: ... |
  RISK: low|medium|high`` (the risk follows a fixed rule per clause type, so it is learnable).
* Client C (``support``): customer support answered in Spanish, whatever the language of the question
  (about 30% of the questions are in English). House style: ``¡Hola! ... ¿Puedo ayudarte en algo más?``

Every record is ``{"instruction": ..., "input"?: ..., "output": ...}`` (holdall.training.data's instruction
format). Content comes from templates and word lists written here; names, numbers, products and question
wordings are drawn with a seeded ``random.Random``, so no single template is memorisable and the output is
byte-identical on every run (the shipped files are exactly this script's output).

Usage:  python benchmarks/make_customer_data.py [--out src/holdall/data/customers] [--n 330] [--seed 2024]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "holdall" / "data" / "customers"
RECORDS_PER_CUSTOMER = 330  # the benchmarks hold out 10% (33) for eval: ~300 train records remain
SEED = 2024

FILES = {"medical": "client_a_medical.jsonl", "legal": "client_b_legal.jsonl", "support": "client_c_support_es.jsonl"}

# --- Client A: medical Q&A ---------------------------------------------------------------------------------
MEDICAL_DISCLAIMER = "This is not a diagnosis; consult your physician."

# drug -> (class, what it treats, a common side effect, a caution). General, textbook-level facts only.
DRUGS = {
    "ibuprofen": ("an NSAID", "pain, fever and inflammation", "stomach upset", "take it with food and avoid it with kidney disease or stomach ulcers"),
    "paracetamol": ("an analgesic", "pain and fever", "rarely a rash", "do not exceed the daily maximum, because overdose harms the liver"),
    "amoxicillin": ("a penicillin antibiotic", "bacterial infections such as otitis and sinusitis", "diarrhoea", "tell the prescriber about any penicillin allergy"),
    "metformin": ("a biguanide", "type 2 diabetes", "nausea and loose stools", "kidney function should be checked regularly"),
    "lisinopril": ("an ACE inhibitor", "high blood pressure and heart failure", "a dry cough", "report any swelling of the lips or face at once"),
    "atorvastatin": ("a statin", "high cholesterol", "muscle aches", "report unexplained muscle pain or dark urine"),
    "omeprazole": ("a proton pump inhibitor", "acid reflux and stomach ulcers", "headache", "long-term use should be reviewed periodically"),
    "sertraline": ("an SSRI antidepressant", "depression and anxiety disorders", "nausea and sleep changes", "do not stop it abruptly"),
    "levothyroxine": ("a thyroid hormone", "an underactive thyroid", "palpitations if the dose is too high", "take it on an empty stomach at the same time each day"),
    "salbutamol": ("a short-acting bronchodilator", "asthma symptoms", "a fast heartbeat and tremor", "needing it more than usual means asthma control should be reviewed"),
    "cetirizine": ("an antihistamine", "hay fever and hives", "drowsiness", "be careful when driving until you know how it affects you"),
    "warfarin": ("an anticoagulant", "blood clots", "bleeding and bruising", "regular INR blood tests are needed"),
    "prednisolone": ("a corticosteroid", "inflammation and flare-ups", "raised blood sugar and mood changes", "longer courses should not be stopped suddenly"),
    "amlodipine": ("a calcium channel blocker", "high blood pressure and angina", "ankle swelling", "stand up slowly if you feel dizzy"),
    "loratadine": ("a non-drowsy antihistamine", "allergy symptoms", "headache", "check with a pharmacist before combining it with other antihistamines"),
    "insulin glargine": ("a long-acting insulin", "diabetes", "low blood sugar", "learn the signs of hypoglycaemia and carry glucose"),
}

# symptom -> (common causes, a red flag that needs prompt care)
SYMPTOMS = {
    "a headache": ("tension, dehydration or poor sleep", "it is sudden and severe or comes with a stiff neck"),
    "a dry cough": ("a viral infection, reflux or an ACE inhibitor", "you cough up blood or feel short of breath"),
    "heartburn": ("acid reflux, large meals or alcohol", "you have trouble swallowing or black stools"),
    "lower back pain": ("muscle strain or posture", "there is leg weakness or numbness in the groin"),
    "a sore throat": ("a viral infection or strep throat", "you cannot swallow fluids or breathe easily"),
    "dizziness": ("dehydration, low blood pressure or inner-ear problems", "you faint or have chest pain"),
    "fatigue": ("poor sleep, stress, anaemia or thyroid problems", "it comes with weight loss or night sweats"),
    "a skin rash": ("an allergy, eczema or a viral illness", "it spreads fast or comes with a fever"),
    "knee pain": ("overuse, arthritis or a ligament strain", "the knee is hot, swollen or cannot bear weight"),
    "a fever": ("a viral or bacterial infection", "it stays above 39 °C or comes with confusion"),
    "diarrhoea": ("a gut infection or food intolerance", "you see blood or cannot keep fluids down"),
    "insomnia": ("stress, caffeine or an irregular schedule", "it lasts for weeks and affects your daytime safety"),
    "chest tightness": ("muscle strain, anxiety or asthma", "it spreads to the arm or jaw or comes with sweating"),
    "swollen ankles": ("long standing, heat or some blood pressure drugs", "only one leg is swollen or it is painful and red"),
}

CONDITIONS = {
    "type 2 diabetes": ("a condition where the body does not use insulin well, so blood sugar rises", "regular activity, diet changes and blood sugar checks"),
    "hypertension": ("blood pressure that stays above the normal range", "less salt, exercise and regular readings"),
    "asthma": ("inflammation that narrows the airways", "avoiding triggers and having an action plan"),
    "migraine": ("recurrent headaches, often one-sided, sometimes with aura", "a headache diary and early treatment of attacks"),
    "iron-deficiency anaemia": ("too few healthy red cells because iron is low", "iron-rich foods and finding the cause of the loss"),
    "hypothyroidism": ("an underactive thyroid gland that slows metabolism", "daily hormone replacement and periodic blood tests"),
    "GERD": ("stomach acid flowing back into the oesophagus", "smaller meals and not lying down after eating"),
    "osteoarthritis": ("wear of the cartilage in a joint", "staying active, weight control and pain relief"),
    "eczema": ("dry, itchy, inflamed skin", "daily moisturiser and avoiding irritants"),
    "high cholesterol": ("too much LDL cholesterol in the blood", "diet, exercise and sometimes a statin"),
}

PATIENTS = ["my mother", "my father", "my son", "my daughter", "my husband", "my wife", "my grandmother", "my neighbour", "I"]


def _medical_drug_use(rng: random.Random) -> dict:
    drug = rng.choice(sorted(DRUGS))
    cls, use, _, caution = DRUGS[drug]
    q = rng.choice([
        f"What is {drug} used for?",
        f"My doctor prescribed {drug}. What does it treat?",
        f"Why would someone take {drug}?",
        f"Can you explain what {drug} is for?",
    ])
    return {"instruction": q, "output": f"Clinical summary: {drug} is {cls} used for {use}. Key point: {caution}. {MEDICAL_DISCLAIMER}"}


def _medical_side_effects(rng: random.Random) -> dict:
    drug = rng.choice(sorted(DRUGS))
    cls, _, side, caution = DRUGS[drug]
    days = rng.choice([2, 3, 5, 7, 10, 14])
    q = rng.choice([
        f"What are the common side effects of {drug}?",
        f"I started {drug} {days} days ago. What side effects should I watch for?",
        f"Does {drug} have side effects?",
    ])
    return {"instruction": q, "output": f"Clinical summary: a common side effect of {drug}, {cls}, is {side}. Key point: {caution}. {MEDICAL_DISCLAIMER}"}


def _medical_interaction(rng: random.Random) -> dict:
    first, second = rng.sample(sorted(DRUGS), 2)
    q = rng.choice([
        f"Can I take {first} together with {second}?",
        f"Is it safe to combine {first} and {second}?",
        f"I already take {first}. Can I add {second}?",
    ])
    out = (f"Clinical summary: {first} and {second} can sometimes interact, and the safe combination depends on your "
           f"doses and other conditions. Key point: ask a pharmacist to check both before combining them. {MEDICAL_DISCLAIMER}")
    return {"instruction": q, "output": out}


def _medical_symptom(rng: random.Random) -> dict:
    symptom = rng.choice(sorted(SYMPTOMS))
    causes, red_flag = SYMPTOMS[symptom]
    who = rng.choice(PATIENTS)
    age = rng.randint(8, 88)
    days = rng.randint(1, 21)
    if who == "I":
        q = f"I am {age} and have had {symptom} for {days} days. What could it be?"
    else:
        q = rng.choice([
            f"{who.capitalize()} ({age}) has had {symptom} for {days} days. What could cause it?",
            f"What could explain {symptom} lasting {days} days in {who}, who is {age}?",
        ])
    out = (f"Clinical summary: {symptom} for {days} days at age {age} is often linked to {causes}. "
           f"Key point: seek care promptly if {red_flag}. {MEDICAL_DISCLAIMER}")
    return {"instruction": q, "output": out}


def _medical_condition(rng: random.Random) -> dict:
    condition = rng.choice(sorted(CONDITIONS))
    what, manage = CONDITIONS[condition]
    q = rng.choice([
        f"What is {condition}?",
        f"I was just diagnosed with {condition}. What does that mean?",
        f"How is {condition} usually managed?",
        f"Explain {condition} in simple terms.",
    ])
    return {"instruction": q, "output": f"Clinical summary: {condition} is {what}. Key point: management usually involves {manage}. {MEDICAL_DISCLAIMER}"}


def medical_record(rng: random.Random) -> dict:
    kind = rng.choice([_medical_drug_use, _medical_side_effects, _medical_interaction, _medical_symptom, _medical_symptom, _medical_condition])
    return kind(rng)


# --- Client B: legal clause summarisation --------------------------------------------------------------------
COMPANIES = ["Northwind Ltd", "Acme GmbH", "Bluepeak Inc", "Orion Logistics", "Verde Foods SL", "Kestrel Systems",
             "Harbor Analytics", "Lumen Health", "Atlas Retail", "Cobalt Energy", "Quill Publishing", "Sable Security",
             "Tern Robotics", "Maple Dental Group", "Polar Freight"]
ROLES = [("Supplier", "Customer"), ("Licensor", "Licensee"), ("Provider", "Client"), ("Contractor", "Company"), ("Landlord", "Tenant")]
LEGAL_INSTRUCTIONS = [
    "Summarise this contract clause.",
    "Summarise the clause below in our house format.",
    "Give me the summary, obligations and risk of this clause.",
    "Review this clause and summarise it.",
    "What does this clause mean for us? Summarise it.",
]


def _parties(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.sample(COMPANIES, 2)
    role_a, role_b = rng.choice(ROLES)
    return a, b, role_a, role_b


def _legal_payment(rng, a, b, ra, rb):
    days = rng.choice([14, 30, 45, 60, 90, 120])
    fee = rng.choice([1, 1.5, 2, 5])
    text = (f"{rb} ({b}) shall pay each invoice issued by {ra} ({a}) within {days} days of receipt. Late amounts "
            f"accrue interest at {fee}% per month until paid in full.")
    risk = "low" if days <= 30 and fee <= 2 else "medium" if days <= 60 else "high"
    return text, f"{b} pays {a}'s invoices within {days} days, with {fee}% monthly late interest", f"{b} must pay on time; {a} must invoice", risk


def _legal_liability(rng, a, b, ra, rb):
    months = rng.choice([3, 6, 12, 24])
    capped = rng.random() < 0.6
    if capped:
        text = (f"Except for fraud, the total liability of {ra} ({a}) under this Agreement shall not exceed the fees "
                f"paid by {rb} ({b}) in the {months} months preceding the claim.")
        return text, f"{a}'s liability is capped at {months} months of fees, except for fraud", f"{b} must claim within the cap; {a} is liable up to it", "low" if months >= 12 else "medium"
    text = (f"{ra} ({a}) shall be liable without limitation for all direct and indirect losses suffered by "
            f"{rb} ({b}) arising from any breach of this Agreement.")
    return text, f"{a} has unlimited liability for direct and indirect losses of {b}", f"{a} must cover all losses from any breach", "high"


def _legal_termination(rng, a, b, ra, rb):
    notice = rng.choice([7, 15, 30, 60, 90])
    text = (f"Either party may terminate this Agreement for convenience by giving {notice} days' written notice. "
            f"{rb} ({b}) shall pay for services rendered up to the termination date.")
    risk = "high" if notice <= 15 else "medium" if notice <= 30 else "low"
    return text, f"either party can end the contract with {notice} days' written notice", f"{b} must pay for services up to termination; the terminating party must give written notice", risk


def _legal_confidentiality(rng, a, b, ra, rb):
    years = rng.choice([1, 2, 3, 5, 10])
    text = (f"Each party shall keep the other party's Confidential Information secret and use it only to perform "
            f"this Agreement, for {years} years after its termination.")
    return text, f"both parties keep each other's information confidential for {years} years after the end", "both parties must protect and limit the use of confidential information", "low" if years >= 3 else "medium"


def _legal_renewal(rng, a, b, ra, rb):
    term = rng.choice([12, 24, 36])
    notice = rng.choice([30, 60, 90, 180])
    increase = rng.choice([2, 3, 5, 10])
    text = (f"This Agreement renews automatically for successive {term}-month terms unless {rb} ({b}) gives notice "
            f"at least {notice} days before renewal. Fees may increase by up to {increase}% at each renewal.")
    risk = "high" if notice >= 90 or increase >= 10 else "medium" if increase >= 5 else "low"
    return text, f"the contract auto-renews for {term} months, with fees up to {increase}% higher", f"{b} must give {notice} days' notice to avoid renewal", risk


def _legal_noncompete(rng, a, b, ra, rb):
    months = rng.choice([6, 12, 24, 36])
    region = rng.choice(["the European Union", "Spain", "North America", "the United Kingdom", "any country where the Company operates"])
    text = (f"During the term and for {months} months thereafter, {ra} ({a}) shall not provide similar services to "
            f"any competitor of {rb} ({b}) in {region}.")
    risk = "high" if months >= 24 else "medium"
    return text, f"{a} may not work for {b}'s competitors in {region} for {months} months after the end", f"{a} must refrain from competing services", risk


def _legal_data(rng, a, b, ra, rb):
    hours = rng.choice([24, 48, 72, 96])
    text = (f"{ra} ({a}) shall process personal data only on documented instructions of {rb} ({b}) and shall "
            f"notify {b} of any personal data breach within {hours} hours of becoming aware of it.")
    risk = "low" if hours <= 48 else "medium" if hours <= 72 else "high"
    return text, f"{a} processes personal data only on {b}'s instructions and reports breaches within {hours} hours", f"{a} must follow instructions and notify breaches within {hours} hours", risk


def _legal_ip(rng, a, b, ra, rb):
    text = (f"All deliverables created by {ra} ({a}) under this Agreement, including source code and documentation, "
            f"shall be the exclusive property of {rb} ({b}) upon full payment.")
    return text, f"{b} owns all deliverables, including code, once it has paid in full", f"{b} must pay in full; {a} must transfer the deliverables", "low"


LEGAL_CLAUSES = [_legal_payment, _legal_liability, _legal_termination, _legal_confidentiality, _legal_renewal,
                 _legal_noncompete, _legal_data, _legal_ip]


def legal_record(rng: random.Random) -> dict:
    a, b, ra, rb = _parties(rng)
    clause, summary, obligations, risk = rng.choice(LEGAL_CLAUSES)(rng, a, b, ra, rb)
    return {
        "instruction": rng.choice(LEGAL_INSTRUCTIONS),
        "input": clause,
        "output": f"SUMMARY: {summary[0].upper() + summary[1:]}. | OBLIGATIONS: {obligations[0].upper() + obligations[1:]}. | RISK: {risk}",
    }


# --- Client C: customer support in Spanish ---------------------------------------------------------------------
SUPPORT_CLOSING = "¿Puedo ayudarte en algo más?"
NAMES = ["Lucía", "Mateo", "Sofía", "Hugo", "Valentina", "Daniel", "Carmen", "Javier", "Elena", "Pablo", "Marta",
         "Diego", "Paula", "Álvaro", "Irene", "Sergio", "Laura", "Andrés", "Noelia", "Tomás"]
PRODUCTS = [("auriculares", "los auriculares", "headphones"), ("cafetera", "la cafetera", "coffee maker"),
            ("zapatillas", "las zapatillas", "trainers"), ("mochila", "la mochila", "backpack"),
            ("tableta", "la tableta", "tablet"), ("lámpara", "la lámpara", "lamp"), ("chaqueta", "la chaqueta", "jacket"),
            ("teclado", "el teclado", "keyboard"), ("reloj", "el reloj", "watch"), ("altavoz", "el altavoz", "speaker")]
CITIES = ["Madrid", "Sevilla", "Valencia", "Bilbao", "Zaragoza", "Málaga", "Granada", "Murcia", "Vigo", "Salamanca"]


def _order(rng: random.Random) -> str:
    return f"#{rng.randint(10000, 99999)}"


def _support_delay(rng):
    name, order, days = rng.choice(NAMES), _order(rng), rng.randint(2, 12)
    q = rng.choice([
        f"Hola, soy {name}. Mi pedido {order} lleva {days} días de retraso. ¿Qué pasa?",
        f"Mi pedido {order} no ha llegado y ya han pasado {days} días.",
        f"Hi, I'm {name}. My order {order} is {days} days late. Where is it?",
    ])
    a = (f"¡Hola! Siento el retraso del pedido {order}, {name}. Saldrá hoy con envío prioritario y te "
         f"mandaremos el seguimiento por correo. {SUPPORT_CLOSING}")
    return q, a


def _support_return(rng):
    name, order = rng.choice(NAMES), _order(rng)
    _, product, english = rng.choice(PRODUCTS)
    q = rng.choice([
        f"Quiero devolver {product} del pedido {order}. ¿Cómo lo hago?",
        f"Soy {name} y {product} del pedido {order} no me convence. ¿Puedo devolverlo?",
        f"How do I return the {english} from order {order}?",
    ])
    a = (f"¡Hola! Claro que sí: tienes 30 días para devolver {product} del pedido {order}. Te he enviado una "
         f"etiqueta de devolución gratuita a tu correo. {SUPPORT_CLOSING}")
    return q, a


def _support_defect(rng):
    order = _order(rng)
    _, product, english = rng.choice(PRODUCTS)
    q = rng.choice([
        f"{product.capitalize()} del pedido {order} llegó roto.",
        f"Me ha llegado {product} con un defecto. Pedido {order}.",
        f"The {english} in order {order} arrived broken.",
    ])
    a = (f"¡Hola! Lamento que {product} llegara en mal estado. Te enviaremos un repuesto sin coste para el pedido "
         f"{order}; no hace falta que devuelvas el defectuoso. {SUPPORT_CLOSING}")
    return q, a


def _support_password(rng):
    name = rng.choice(NAMES)
    q = rng.choice([
        "No puedo entrar en mi cuenta, he olvidado la contraseña.",
        f"Soy {name} y no recuerdo mi contraseña. ¿Qué hago?",
        "I forgot my password and can't log in.",
    ])
    a = ("¡Hola! Pulsa «¿Has olvidado tu contraseña?» en la página de acceso y te enviaremos un enlace válido "
         f"durante 30 minutos para crear una nueva. {SUPPORT_CLOSING}")
    return q, a


def _support_invoice(rng):
    order, amount = _order(rng), f"{rng.randint(12, 480)},{rng.randint(0, 99):02d} €"
    q = rng.choice([
        f"Me habéis cobrado dos veces el pedido {order}, {amount} cada vez.",
        f"Veo un cargo duplicado de {amount} por el pedido {order}.",
        f"I was charged twice ({amount}) for order {order}.",
    ])
    a = (f"¡Hola! Disculpa las molestias. He pedido el reembolso del cargo duplicado de {amount} del pedido "
         f"{order}; lo verás en 3 a 5 días hábiles. {SUPPORT_CLOSING}")
    return q, a


def _support_address(rng):
    order, city = _order(rng), rng.choice(CITIES)
    q = rng.choice([
        f"¿Puedo cambiar la dirección de entrega del pedido {order}? Ahora estoy en {city}.",
        f"Necesito que el pedido {order} llegue a {city} en vez de a mi casa.",
        f"Can I change the delivery address of order {order} to {city}?",
    ])
    a = (f"¡Hola! Sí, el pedido {order} aún no ha salido del almacén, así que he cambiado la entrega a {city}. "
         f"Recibirás la confirmación por correo. {SUPPORT_CLOSING}")
    return q, a


def _support_cancel(rng):
    name, plan = rng.choice(NAMES), rng.choice(["Básico", "Plus", "Premium"])
    q = rng.choice([
        f"Quiero cancelar mi suscripción {plan}.",
        f"Soy {name}, ¿cómo me doy de baja del plan {plan}?",
        f"How do I cancel my {plan} subscription?",
    ])
    a = (f"¡Hola! He cancelado tu suscripción {plan}; seguirás teniendo acceso hasta el final del periodo ya pagado "
         f"y no se te cobrará nada más. {SUPPORT_CLOSING}")
    return q, a


def _support_coupon(rng):
    code, pct = f"{rng.choice(['VERANO', 'BIENVENIDA', 'OTOÑO', 'AMIGO'])}{rng.randint(10, 30)}", rng.choice([10, 15, 20])
    q = rng.choice([
        f"El cupón {code} no funciona en el carrito.",
        f"¿Por qué no se aplica mi descuento {code}?",
        f"My coupon {code} doesn't work at checkout.",
    ])
    a = (f"¡Hola! El cupón {code} da un {pct} % de descuento en pedidos de más de 40 €. Revisa el carrito "
         f"y escríbelo en mayúsculas. {SUPPORT_CLOSING}")
    return q, a


SUPPORT_TOPICS = [_support_delay, _support_return, _support_defect, _support_password, _support_invoice,
                  _support_address, _support_cancel, _support_coupon]


def support_record(rng: random.Random) -> dict:
    question, answer = rng.choice(SUPPORT_TOPICS)(rng)
    return {"instruction": question, "output": answer}


# --- writing ---------------------------------------------------------------------------------------------------
MAKERS = {"medical": medical_record, "legal": legal_record, "support": support_record}


def make_records(customer: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct records for ``customer`` (duplicate instructions+inputs are redrawn: the held-out split
    must not contain a prompt the training split also has)."""
    # one RNG per customer, seeded from (seed, customer name), so changing one customer never shifts another
    rng = random.Random(f"{seed}:{customer}")
    seen, records = set(), []
    while len(records) < n:
        record = MAKERS[customer](rng)
        key = (record["instruction"], record.get("input", ""))
        if key in seen:
            continue
        seen.add(key)
        records.append(record)
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # ensure_ascii=False keeps the Spanish readable; "\n" line ends on every platform
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--n", type=int, default=RECORDS_PER_CUSTOMER, help="records per customer")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for customer, filename in FILES.items():
        records = make_records(customer, args.n, args.seed)
        write_jsonl(records, args.out / filename)
        print(f"{customer}: {len(records)} records -> {args.out / filename}")


if __name__ == "__main__":
    main()
