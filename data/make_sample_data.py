#!/usr/bin/env python3
"""Generate the project's small synthetic medical sample data.

Everything under data/ except this script is produced by it:

    python3 data/make_sample_data.py            # rewrite all files
    python3 data/make_sample_data.py --check    # regenerate in memory, compare

The texts are composed from the hand-written building blocks below (30
conditions, each with a fixed set of symptoms, tests, first-line care,
red-flag signs, prevention tips, usual course and one key fact, in English and
Simplified Chinese, plus short glossaries of symptoms, tests and treatments).
Facts for one condition never change between records, so a tiny model can
learn them. About 85% of the records are English and 15% Chinese.

Standard library only; fully deterministic (random.Random(SEED)).
The data is for demos and tests of the training pipeline, NOT medical advice.
"""

import json
import os
import random
import sys

SEED = 20240601
ZH_SHARE = 0.15
MAX_ANSWER_CHARS = 400
MAX_CONVERSATION_CHARS = 700

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------
# Building blocks: conditions
# ---------------------------------------------------------------------------
# Per language:
#   name        noun phrase used inside sentences (with article where needed)
#   system      what it mainly affects ("It mainly affects {system}.")
#   defn        noun phrase: "{Name} is {defn}."
#   cause       full sentence (en may start with "It"; zh is a predicate that
#               reads well both on its own and right after the name)
#   symptoms    noun phrases
#   tests       noun phrases
#   care        base-form verb phrases ("it usually helps to {care}")
#   red         red-flag noun phrases ("see a doctor if you notice {red}")
#   prevention  base-form verb phrases
#   course      sentence
#   note        key fact sentence
#   symptom_note (optional) replaces the symptom intro for silent conditions
#   qa          (question, short answer) used for the GRPO-style file

CONDITIONS = [
    {
        "key": "common_cold", "acute": True,
        "en": {
            "name": "the common cold", "system": "the respiratory system",
            "defn": "a mild viral infection of the nose and throat",
            "cause": "It is usually caused by rhinoviruses and spreads through droplets and contaminated hands.",
            "symptoms": ["a runny or stuffy nose", "sneezing", "a sore throat", "a mild cough"],
            "tests": ["a review of symptoms", "a brief physical examination"],
            "care": ["rest", "drink plenty of fluids", "use a saline nasal spray", "gargle with warm salt water"],
            "red": ["difficulty breathing", "a fever that lasts more than three days", "symptoms that last longer than ten days"],
            "prevention": ["wash your hands often", "avoid touching your eyes, nose and mouth"],
            "course": "Most people recover within 7 to 10 days.",
            "note": "Antibiotics do not work against cold viruses.",
            "qa": ("Do antibiotics help the common cold?", "No. Antibiotics do not work against cold viruses."),
        },
        "zh": {
            "name": "普通感冒", "system": "呼吸系统",
            "defn": "一种由病毒引起的、较轻的鼻部和咽喉感染",
            "cause": "通常由鼻病毒引起，可通过飞沫和被污染的手传播。",
            "symptoms": ["流鼻涕或鼻塞", "打喷嚏", "咽喉痛", "轻微咳嗽"],
            "tests": ["询问症状", "简单的体格检查"],
            "care": ["多休息", "多喝水", "用生理盐水喷鼻", "用温盐水漱口"],
            "red": ["呼吸困难", "发热超过三天", "症状持续超过十天"],
            "prevention": ["勤洗手", "避免用手触摸眼、鼻和口"],
            "course": "大多数人在7到10天内康复。",
            "note": "抗生素对感冒病毒无效。",
            "qa": ("抗生素对普通感冒有效吗？", "无效。抗生素对感冒病毒不起作用。"),
        },
    },
    {
        "key": "influenza", "acute": True,
        "en": {
            "name": "the flu", "system": "the respiratory system",
            "defn": "a contagious viral infection of the nose, throat and lungs",
            "cause": "It is caused by influenza viruses and spreads easily in autumn and winter.",
            "symptoms": ["a sudden fever", "muscle aches", "tiredness", "a dry cough"],
            "tests": ["a physical examination", "a rapid influenza test from a nose swab"],
            "care": ["rest at home", "drink plenty of fluids", "use paracetamol for fever if needed, following the label"],
            "red": ["shortness of breath", "chest pain", "confusion or severe drowsiness"],
            "prevention": ["get a flu vaccine every year", "wash your hands often"],
            "course": "Most people feel better within one to two weeks, but tiredness can last longer.",
            "note": "Antiviral medicines prescribed by a doctor work best when started within two days of symptoms.",
            "qa": ("What is the most effective way to prevent the flu?", "Getting a flu vaccine every year."),
        },
        "zh": {
            "name": "流感", "system": "呼吸系统",
            "defn": "一种由流感病毒引起的、传染性较强的呼吸道感染",
            "cause": "由流感病毒引起，秋冬季节容易传播。",
            "symptoms": ["突然发热", "肌肉酸痛", "乏力", "干咳"],
            "tests": ["体格检查", "鼻拭子流感快速检测"],
            "care": ["在家休息", "多喝水", "必要时按说明书使用对乙酰氨基酚退热"],
            "red": ["呼吸急促", "胸痛", "意识模糊或特别嗜睡"],
            "prevention": ["每年接种流感疫苗", "勤洗手"],
            "course": "大多数人在一到两周内好转，但乏力可能持续更久。",
            "note": "抗病毒药物需要医生开具，在发病两天内使用效果最好。",
            "qa": ("预防流感最有效的方法是什么？", "每年接种流感疫苗。"),
        },
    },
    {
        "key": "gastroenteritis", "acute": True,
        "en": {
            "name": "acute gastroenteritis", "system": "the digestive system",
            "defn": "an inflammation of the stomach and intestines, usually caused by an infection",
            "cause": "It is most often caused by viruses such as norovirus, and sometimes by contaminated food or water.",
            "symptoms": ["diarrhea", "nausea", "vomiting", "stomach cramps"],
            "tests": ["a physical examination", "a stool test in some cases"],
            "care": ["sip water or oral rehydration solution often", "rest", "eat bland foods when you feel ready"],
            "red": ["signs of dehydration such as passing very little urine", "blood in the stool", "vomiting that stops you keeping fluids down for a day"],
            "prevention": ["wash your hands after using the toilet and before eating", "store and cook food safely"],
            "course": "Most cases settle within a few days.",
            "note": "Preventing dehydration is the most important part of treatment.",
            "qa": ("What is the most important part of treating acute gastroenteritis?", "Preventing dehydration by drinking fluids or oral rehydration solution."),
        },
        "zh": {
            "name": "急性胃肠炎", "system": "消化系统",
            "defn": "胃和肠道的急性炎症，多由感染引起",
            "cause": "最常见的原因是诺如病毒等病毒，也可能由不洁的食物或饮水引起。",
            "symptoms": ["腹泻", "恶心", "呕吐", "腹部绞痛"],
            "tests": ["体格检查", "大便检查（必要时）"],
            "care": ["少量多次地喝水或口服补液盐", "多休息", "感觉好转后吃清淡的食物"],
            "red": ["尿量明显减少等脱水表现", "大便带血", "呕吐超过一天、喝不下水"],
            "prevention": ["便后和饭前洗手", "注意食物的储存和烹饪卫生"],
            "course": "大多数病例在几天内好转。",
            "note": "预防脱水是治疗中最重要的一环。",
            "qa": ("治疗急性胃肠炎最重要的是什么？", "预防脱水，少量多次地喝水或口服补液盐。"),
        },
    },
    {
        "key": "tension_headache", "acute": True,
        "en": {
            "name": "a tension-type headache", "system": "the nervous system",
            "defn": "the most common type of headache, felt as a steady band of pressure around the head",
            "cause": "It is often linked to stress, poor sleep, long screen time or tight neck and shoulder muscles.",
            "symptoms": ["a dull, pressing pain on both sides of the head", "tightness across the forehead", "tender neck and shoulder muscles", "difficulty concentrating"],
            "tests": ["a careful headache history", "a physical and neurological examination"],
            "care": ["rest in a quiet room", "apply a warm compress to the neck", "take a common over-the-counter pain reliever as directed on the label"],
            "red": ["a sudden, severe headache unlike any before", "a headache with fever and a stiff neck", "weakness, confusion or trouble speaking"],
            "prevention": ["keep regular sleep hours", "take breaks from screens and stretch your neck"],
            "course": "An episode usually lasts from 30 minutes to several hours.",
            "note": "Using pain relievers on many days each week can cause rebound headaches.",
            "qa": ("What can happen if pain relievers are used for headaches on many days each week?", "They can cause rebound (medication-overuse) headaches."),
        },
        "zh": {
            "name": "紧张性头痛", "system": "神经系统",
            "defn": "最常见的一种头痛，表现为头部周围持续的紧箍感或压迫感",
            "cause": "常与压力大、睡眠不足、长时间看屏幕或颈肩肌肉紧张有关。",
            "symptoms": ["双侧头部钝痛或压迫感", "前额紧绷感", "颈肩肌肉酸痛", "注意力难以集中"],
            "tests": ["详细询问病史", "神经系统检查"],
            "care": ["在安静的房间休息", "热敷颈部", "按说明书服用常见的非处方止痛药"],
            "red": ["突发的、前所未有的剧烈头痛", "头痛伴发热和颈部僵硬", "肢体无力、意识模糊或说话困难"],
            "prevention": ["保持规律作息", "看屏幕时定时休息并活动颈部"],
            "course": "每次发作通常持续30分钟到数小时。",
            "note": "每周多天服用止痛药可能导致药物过度使用性头痛。",
            "qa": ("头痛时每周多天服用止痛药会有什么问题？", "可能导致药物过度使用性头痛（反跳性头痛）。"),
        },
    },
    {
        "key": "migraine", "acute": True,
        "en": {
            "name": "migraine", "system": "the nervous system",
            "defn": "a recurring headache disorder with moderate to severe throbbing pain",
            "cause": "Attacks can be triggered by lack of sleep, stress, skipped meals, hormonal changes or certain foods.",
            "symptoms": ["throbbing pain, often on one side of the head", "nausea", "sensitivity to light and sound", "visual changes called aura"],
            "tests": ["a detailed headache history", "a neurological examination"],
            "care": ["rest in a dark, quiet room", "take a pain reliever early in the attack", "keep a headache diary to find triggers"],
            "red": ["a sudden, severe headache unlike previous ones", "weakness or numbness on one side of the body", "a headache after a head injury"],
            "prevention": ["keep regular sleep and meal times", "limit known triggers"],
            "course": "An attack typically lasts from 4 hours to 3 days.",
            "note": "A doctor can prescribe specific migraine medicines if attacks are frequent.",
            "qa": ("How long does a migraine attack typically last?", "From about 4 hours to 3 days."),
        },
        "zh": {
            "name": "偏头痛", "system": "神经系统",
            "defn": "一种反复发作的头痛疾病，疼痛多为中到重度的搏动性疼痛",
            "cause": "发作可由睡眠不足、压力、饥饿、激素变化或某些食物诱发。",
            "symptoms": ["一侧搏动性头痛", "恶心", "怕光怕声", "视觉先兆"],
            "tests": ["详细询问头痛病史", "神经系统检查"],
            "care": ["在黑暗安静的房间休息", "在发作早期服用止痛药", "记录头痛日记以找出诱因"],
            "red": ["突发的、与以往不同的剧烈头痛", "一侧肢体无力或麻木", "头部外伤后出现头痛"],
            "prevention": ["保持规律的睡眠和进餐时间", "尽量避开已知诱因"],
            "course": "一次发作通常持续4小时到3天。",
            "note": "如果发作频繁，医生可以开具专门的偏头痛药物。",
            "qa": ("偏头痛一次发作通常持续多久？", "通常持续4小时到3天。"),
        },
    },
    {
        "key": "hypertension", "acute": False, "silent": True,
        "en": {
            "name": "high blood pressure", "system": "the cardiovascular system",
            "defn": "a long-term condition in which the force of blood against the artery walls is too high",
            "cause": "It is linked to older age, excess weight, high salt intake, lack of exercise, smoking and family history.",
            "symptoms": ["headaches", "dizziness", "blurred vision"],
            "symptom_note": "High blood pressure usually causes no symptoms, which is why regular checks are important.",
            "tests": ["repeated blood pressure measurements", "blood and urine tests to check the kidneys"],
            "care": ["reduce salt in your diet", "exercise regularly", "take prescribed medicines every day"],
            "red": ["a very high reading with chest pain", "a sudden severe headache with confusion", "weakness on one side of the body or trouble speaking"],
            "prevention": ["keep a healthy weight", "limit salt and alcohol"],
            "course": "It is usually a lifelong condition that can be well controlled.",
            "note": "Untreated high blood pressure raises the risk of heart attack, stroke and kidney disease.",
            "qa": ("Why should adults have their blood pressure checked regularly?", "Because high blood pressure usually causes no symptoms."),
        },
        "zh": {
            "name": "高血压", "system": "心血管系统",
            "defn": "一种长期疾病，指血液对动脉血管壁的压力持续偏高",
            "cause": "与年龄增长、超重、吃盐过多、缺乏运动、吸烟和家族史有关。",
            "symptoms": ["头痛", "头晕", "视物模糊"],
            "symptom_note": "高血压通常没有任何症状，所以定期测量血压很重要。",
            "tests": ["多次测量血压", "血液、尿液检查（了解肾脏情况）"],
            "care": ["减少饮食中的盐", "规律运动", "每天按时服用医生开的降压药"],
            "red": ["血压很高并伴有胸痛", "突发剧烈头痛伴意识模糊", "一侧肢体无力或说话困难"],
            "prevention": ["保持健康体重", "限制盐和酒的摄入"],
            "course": "通常需要长期管理，但可以得到良好控制。",
            "note": "未经治疗的高血压会增加心脏病、中风和肾病的风险。",
            "qa": ("为什么成年人要定期测量血压？", "因为高血压通常没有任何症状。"),
        },
    },
    {
        "key": "type2_diabetes", "acute": False,
        "en": {
            "name": "type 2 diabetes", "system": "the endocrine system",
            "defn": "a long-term condition in which the body does not use insulin well, so blood sugar stays too high",
            "cause": "It is linked to excess weight, physical inactivity, family history and older age.",
            "symptoms": ["increased thirst", "frequent urination", "tiredness", "slow-healing cuts"],
            "tests": ["a fasting blood glucose test", "an HbA1c blood test"],
            "care": ["eat a balanced diet with fewer sugary drinks", "stay physically active", "take medicines as prescribed and check blood sugar as advised"],
            "red": ["very high blood sugar readings with vomiting", "confusion or extreme drowsiness", "a foot wound that is red, swollen or not healing"],
            "prevention": ["keep a healthy weight", "be active for at least 150 minutes a week"],
            "course": "It is a lifelong condition, but good control greatly lowers the risk of complications.",
            "note": "Regular eye, foot and kidney checks help prevent complications.",
            "qa": ("Which blood test shows the average blood sugar over the past two to three months?", "The HbA1c test."),
        },
        "zh": {
            "name": "2型糖尿病", "system": "内分泌系统",
            "defn": "一种长期疾病，身体不能有效利用胰岛素，导致血糖持续偏高",
            "cause": "与超重、缺乏运动、家族史和年龄增长有关。",
            "symptoms": ["口渴加重", "尿频", "乏力", "伤口愈合慢"],
            "tests": ["空腹血糖检测", "糖化血红蛋白（HbA1c）检测"],
            "care": ["均衡饮食，少喝含糖饮料", "保持运动", "按医嘱用药并监测血糖"],
            "red": ["血糖很高并伴有呕吐", "意识模糊或极度嗜睡", "足部伤口红肿或久不愈合"],
            "prevention": ["保持健康体重", "每周至少运动150分钟"],
            "course": "这是一种终身疾病，但控制良好可以大大降低并发症风险。",
            "note": "定期检查眼睛、足部和肾脏有助于预防并发症。",
            "qa": ("哪项血液检查能反映过去两到三个月的平均血糖？", "糖化血红蛋白（HbA1c）检测。"),
        },
    },
    {
        "key": "iron_deficiency_anemia", "acute": False,
        "en": {
            "name": "iron-deficiency anemia", "system": "the blood",
            "defn": "a condition in which the body lacks enough iron to make healthy red blood cells",
            "cause": "Common causes include heavy menstrual periods, low iron intake, pregnancy and slow blood loss from the gut.",
            "symptoms": ["tiredness", "pale skin", "shortness of breath on exertion", "dizziness"],
            "tests": ["a complete blood count", "a ferritin blood test"],
            "care": ["eat iron-rich foods such as lean meat, beans and leafy greens", "take iron supplements only if a doctor recommends them", "have the underlying cause checked"],
            "red": ["black or bloody stools", "chest pain or a racing heart", "fainting"],
            "prevention": ["eat a varied diet with iron-rich foods", "get heavy periods checked by a doctor"],
            "course": "With treatment, blood levels usually improve over a few weeks to months.",
            "note": "Foods rich in vitamin C help the body absorb iron.",
            "qa": ("Which vitamin helps the body absorb iron from food?", "Vitamin C."),
        },
        "zh": {
            "name": "缺铁性贫血", "system": "血液系统",
            "defn": "体内缺乏足够的铁、无法生成足够健康红细胞的一种疾病",
            "cause": "常见原因包括月经量过多、铁摄入不足、怀孕以及胃肠道慢性失血。",
            "symptoms": ["乏力", "面色苍白", "活动后气短", "头晕"],
            "tests": ["血常规检查", "血清铁蛋白检测"],
            "care": ["多吃瘦肉、豆类和深绿色蔬菜等富含铁的食物", "只在医生建议时服用铁剂", "查明贫血的原因"],
            "red": ["黑便或便血", "胸痛或心跳很快", "晕厥"],
            "prevention": ["饮食多样化，摄入富含铁的食物", "月经量过多时及时就医"],
            "course": "经过治疗，血液指标通常在数周到数月内改善。",
            "note": "富含维生素C的食物有助于铁的吸收。",
            "qa": ("哪种维生素有助于人体吸收食物中的铁？", "维生素C。"),
        },
    },
    {
        "key": "asthma", "acute": False,
        "en": {
            "name": "asthma", "system": "the respiratory system",
            "defn": "a long-term condition in which the airways become inflamed and narrowed",
            "cause": "Attacks can be triggered by colds, allergens such as dust mites and pollen, smoke, cold air and exercise.",
            "symptoms": ["wheezing", "shortness of breath", "chest tightness", "a cough that is worse at night"],
            "tests": ["a spirometry breathing test", "peak flow measurements"],
            "care": ["use inhalers exactly as prescribed", "avoid known triggers", "follow a written asthma action plan"],
            "red": ["severe breathlessness or being unable to speak in full sentences", "blue or grey lips", "a reliever inhaler that is not helping"],
            "prevention": ["avoid smoke and known allergens", "take preventer medicine regularly if it is prescribed"],
            "course": "It is usually long-term, but most people can control it well with treatment.",
            "note": "A reliever inhaler should always be carried.",
            "qa": ("Which breathing test is commonly used to diagnose asthma?", "Spirometry."),
        },
        "zh": {
            "name": "哮喘", "system": "呼吸系统",
            "defn": "一种气道慢性炎症、使气道变窄的长期疾病",
            "cause": "可由感冒、尘螨和花粉等过敏原、烟雾、冷空气和运动诱发。",
            "symptoms": ["喘息", "气短", "胸闷", "夜间加重的咳嗽"],
            "tests": ["肺功能检查", "峰流速测定"],
            "care": ["严格按医嘱使用吸入药物", "避开已知诱因", "按照书面的哮喘行动计划处理"],
            "red": ["严重气喘、说话不能成句", "嘴唇发青或发灰", "使用缓解药后仍不见好转"],
            "prevention": ["避免烟雾和已知过敏原", "如医生开了控制药物要规律使用"],
            "course": "通常是长期的，但大多数人经过治疗可以控制良好。",
            "note": "应随身携带缓解用的吸入药。",
            "qa": ("诊断哮喘常用哪项呼吸检查？", "肺功能检查。"),
        },
    },
    {
        "key": "uti", "acute": True,
        "en": {
            "name": "a urinary tract infection", "system": "the urinary system",
            "defn": "an infection of the bladder or other parts of the urinary tract, usually caused by bacteria",
            "cause": "It is usually caused by gut bacteria entering the urethra and is more common in women.",
            "symptoms": ["burning or pain when urinating", "needing to urinate often", "cloudy or strong-smelling urine", "lower abdominal discomfort"],
            "tests": ["a urine dipstick test", "a urine culture"],
            "care": ["see a doctor, who may prescribe antibiotics", "drink plenty of water", "finish any prescribed course of antibiotics"],
            "red": ["fever and chills", "pain in the back or side", "vomiting"],
            "prevention": ["drink enough fluids", "urinate after sexual intercourse"],
            "course": "With appropriate treatment, symptoms usually improve within a few days.",
            "note": "An untreated infection can spread to the kidneys.",
            "qa": ("What can happen if a urinary tract infection is not treated?", "The infection can spread to the kidneys."),
        },
        "zh": {
            "name": "尿路感染", "system": "泌尿系统",
            "defn": "膀胱或尿路其他部位的感染，通常由细菌引起",
            "cause": "多由肠道细菌进入尿道引起，女性更常见。",
            "symptoms": ["排尿时烧灼感或疼痛", "尿频", "尿液浑浊或气味重", "下腹部不适"],
            "tests": ["尿常规试纸检测", "尿培养"],
            "care": ["就医，医生可能会开抗生素", "多喝水", "按疗程服完医生开的抗生素"],
            "red": ["发热和寒战", "腰部或侧腹疼痛", "呕吐"],
            "prevention": ["保证足够的饮水", "性生活后排尿"],
            "course": "经过恰当治疗，症状通常在几天内改善。",
            "note": "不治疗的话，感染可能扩散到肾脏。",
            "qa": ("尿路感染不治疗可能会怎样？", "感染可能扩散到肾脏。"),
        },
    },
    {
        "key": "gerd", "acute": False,
        "en": {
            "name": "acid reflux (GERD)", "system": "the digestive system",
            "defn": "a condition in which stomach acid often flows back into the food pipe",
            "cause": "It can be made worse by large meals, lying down after eating, excess weight, smoking and some foods.",
            "symptoms": ["heartburn", "a sour taste in the mouth", "burping", "discomfort that is worse after meals or when lying down"],
            "tests": ["a review of symptoms", "an endoscopy if symptoms are severe or persistent"],
            "care": ["eat smaller meals", "avoid lying down for two to three hours after eating", "raise the head of the bed"],
            "red": ["difficulty swallowing", "vomiting blood or black stools", "unintended weight loss"],
            "prevention": ["keep a healthy weight", "limit fatty foods, alcohol and late meals"],
            "course": "It is often long-lasting but usually improves with lifestyle changes and treatment.",
            "note": "Over-the-counter antacids can relieve occasional symptoms.",
            "qa": ("How long should you wait after eating before lying down if you have acid reflux?", "Two to three hours."),
        },
        "zh": {
            "name": "胃食管反流病", "system": "消化系统",
            "defn": "胃酸经常反流到食管的一种疾病",
            "cause": "可因吃得过饱、饭后立即躺下、超重、吸烟和某些食物而加重。",
            "symptoms": ["烧心", "口中发酸", "嗳气", "饭后或躺下时加重的不适"],
            "tests": ["询问症状", "胃镜检查（症状严重或持续时）"],
            "care": ["少食多餐", "饭后两到三小时内不要躺下", "睡觉时抬高床头"],
            "red": ["吞咽困难", "呕血或黑便", "不明原因的体重下降"],
            "prevention": ["保持健康体重", "少吃油腻食物、少喝酒、避免太晚进食"],
            "course": "常常是长期的，但通过调整生活方式和治疗通常能改善。",
            "note": "偶尔发作时，非处方抗酸药可以缓解症状。",
            "qa": ("有胃食管反流的人饭后多久内不要躺下？", "两到三小时。"),
        },
    },
    {
        "key": "low_back_pain", "acute": True,
        "en": {
            "name": "acute low back pain", "system": "the musculoskeletal system",
            "defn": "pain in the lower back that starts suddenly, most often from a strained muscle or ligament",
            "cause": "It often follows lifting, twisting, poor posture or long periods of sitting.",
            "symptoms": ["aching or stiffness in the lower back", "pain that is worse with movement", "muscle spasms", "difficulty standing up straight"],
            "tests": ["a physical examination", "imaging only if warning signs are present"],
            "care": ["stay gently active instead of resting in bed", "apply heat or cold", "take a common over-the-counter pain reliever if needed"],
            "red": ["numbness around the groin or buttocks", "new loss of bladder or bowel control", "back pain with fever or after a serious fall"],
            "prevention": ["lift with your knees, not your back", "exercise to strengthen your core muscles"],
            "course": "Most episodes improve within a few weeks.",
            "note": "Most back pain is not caused by serious disease.",
            "qa": ("Is bed rest recommended for acute low back pain?", "No. Staying gently active is recommended."),
        },
        "zh": {
            "name": "急性腰痛", "system": "肌肉骨骼系统",
            "defn": "突然发生的下背部疼痛，最常见的原因是肌肉或韧带拉伤",
            "cause": "常发生在搬重物、扭腰、姿势不良或久坐之后。",
            "symptoms": ["腰部酸痛或僵硬", "活动时疼痛加重", "肌肉痉挛", "难以站直"],
            "tests": ["体格检查", "影像检查（仅在出现危险信号时）"],
            "care": ["保持适度活动，不要长期卧床", "热敷或冷敷", "必要时服用常见的非处方止痛药"],
            "red": ["腹股沟或臀部周围麻木", "大小便失控", "腰痛伴发热或发生在严重摔伤之后"],
            "prevention": ["搬重物时屈膝而不是弯腰", "锻炼核心肌肉"],
            "course": "大多数发作在几周内好转。",
            "note": "绝大多数腰痛并不是由严重疾病引起的。",
            "qa": ("急性腰痛需要卧床休息吗？", "不需要。建议保持适度活动。"),
        },
    },
    {
        "key": "allergic_rhinitis", "acute": False,
        "en": {
            "name": "allergic rhinitis (hay fever)", "system": "the respiratory system",
            "defn": "an allergic reaction in the nose to substances such as pollen, dust mites or pet dander",
            "cause": "It happens when the immune system overreacts to harmless particles in the air.",
            "symptoms": ["sneezing", "an itchy, runny nose", "itchy, watery eyes", "a blocked nose"],
            "tests": ["a review of symptoms and triggers", "skin prick or blood allergy tests"],
            "care": ["avoid known allergens", "rinse the nose with saline", "use non-drowsy antihistamines or nasal sprays as directed"],
            "red": ["wheezing or difficulty breathing", "symptoms that disrupt sleep or work despite treatment", "swelling of the face or lips"],
            "prevention": ["keep windows closed on high-pollen days", "wash bedding often in hot water"],
            "course": "Symptoms often return each season but can be well controlled.",
            "note": "Unlike a cold, hay fever does not cause a fever and can last for weeks.",
            "qa": ("Does hay fever cause a fever?", "No. Despite its name, hay fever does not cause a fever."),
        },
        "zh": {
            "name": "过敏性鼻炎", "system": "呼吸系统",
            "defn": "鼻腔对花粉、尘螨或宠物皮屑等物质产生的过敏反应",
            "cause": "是免疫系统对空气中无害颗粒过度反应造成的。",
            "symptoms": ["打喷嚏", "鼻痒、流清涕", "眼睛发痒、流泪", "鼻塞"],
            "tests": ["询问症状及诱因", "皮肤点刺试验或血液过敏原检测"],
            "care": ["避开已知过敏原", "用生理盐水洗鼻", "按说明使用不易犯困的抗组胺药或鼻喷剂"],
            "red": ["喘息或呼吸困难", "治疗后症状仍影响睡眠或工作", "面部或嘴唇肿胀"],
            "prevention": ["花粉多的日子关好窗户", "经常用热水清洗床上用品"],
            "course": "症状常常每个季节反复，但可以得到良好控制。",
            "note": "与感冒不同，过敏性鼻炎不会引起发热，并可持续数周。",
            "qa": ("过敏性鼻炎会引起发热吗？", "不会。过敏性鼻炎不会引起发热。"),
        },
    },
    {
        "key": "eczema", "acute": False,
        "en": {
            "name": "eczema (atopic dermatitis)", "system": "the skin",
            "defn": "a long-term skin condition that causes dry, itchy and inflamed patches",
            "cause": "It is linked to a weak skin barrier, genetics and triggers such as soaps, heat, stress and allergens.",
            "symptoms": ["dry skin", "intense itching", "red or darker patches", "cracked or rough skin"],
            "tests": ["an examination of the skin", "allergy tests in some cases"],
            "care": ["moisturize the skin several times a day", "use mild, fragrance-free soap", "apply creams prescribed by a doctor during flare-ups"],
            "red": ["weeping, crusted or very painful skin", "a fever with a spreading rash", "clusters of painful blisters"],
            "prevention": ["avoid harsh soaps and known triggers", "keep nails short to reduce damage from scratching"],
            "course": "It tends to come and go in flare-ups.",
            "note": "Scratching can damage the skin and lead to infection.",
            "qa": ("What is the most important daily skin care for eczema?", "Moisturizing the skin several times a day."),
        },
        "zh": {
            "name": "湿疹", "system": "皮肤",
            "defn": "一种长期的皮肤疾病，会引起干燥、瘙痒和发炎的皮疹",
            "cause": "与皮肤屏障功能较弱、遗传以及肥皂、炎热、压力和过敏原等诱因有关。",
            "symptoms": ["皮肤干燥", "剧烈瘙痒", "发红或颜色变深的斑片", "皮肤粗糙或皲裂"],
            "tests": ["皮肤检查", "过敏检测（必要时）"],
            "care": ["每天多次涂抹保湿霜", "使用温和、无香料的清洁产品", "发作期按医嘱使用药膏"],
            "red": ["皮肤渗液、结痂或剧烈疼痛", "发热并伴有扩散的皮疹", "成簇的疼痛性水疱"],
            "prevention": ["避免刺激性肥皂和已知诱因", "剪短指甲以减少抓伤"],
            "course": "常常时好时坏，反复发作。",
            "note": "搔抓会损伤皮肤并可能引起感染。",
            "qa": ("湿疹日常护理最重要的是什么？", "每天多次涂抹保湿霜。"),
        },
    },
    {
        "key": "insomnia", "acute": False,
        "en": {
            "name": "insomnia", "system": "the nervous system",
            "defn": "a sleep problem in which a person has trouble falling asleep, staying asleep or wakes too early",
            "cause": "Common causes include stress, irregular schedules, caffeine, screen use at night, pain and mood problems.",
            "symptoms": ["difficulty falling asleep", "waking during the night", "waking too early", "daytime tiredness and irritability"],
            "tests": ["a sleep history", "a sleep diary kept for one to two weeks"],
            "care": ["keep the same sleep and wake times every day", "avoid caffeine after midday", "keep screens out of the bedroom"],
            "red": ["loud snoring with pauses in breathing", "falling asleep while driving", "low mood or thoughts of self-harm"],
            "prevention": ["get daylight and exercise during the day", "keep a relaxing bedtime routine"],
            "course": "Short-term insomnia often settles when the trigger passes.",
            "note": "Cognitive behavioral therapy for insomnia is the recommended first-line treatment.",
            "qa": ("What is the recommended first-line treatment for long-term insomnia?", "Cognitive behavioral therapy for insomnia (CBT-I)."),
        },
        "zh": {
            "name": "失眠", "system": "神经系统",
            "defn": "一种睡眠问题，表现为入睡困难、睡眠中易醒或早醒",
            "cause": "常见原因包括压力、作息不规律、咖啡因、睡前使用电子屏幕、疼痛和情绪问题。",
            "symptoms": ["入睡困难", "夜间易醒", "早醒", "白天疲倦"],
            "tests": ["询问睡眠情况", "记录一到两周的睡眠日记"],
            "care": ["每天固定时间睡觉和起床", "中午以后避免咖啡因", "不要把手机等屏幕带进卧室"],
            "red": ["打鼾很响并有呼吸暂停", "开车时打瞌睡", "情绪低落或有伤害自己的念头"],
            "prevention": ["白天多晒太阳、多运动", "睡前保持放松的习惯"],
            "course": "短期失眠在诱因消除后常会好转。",
            "note": "失眠的认知行为治疗是推荐的首选治疗。",
            "qa": ("长期失眠推荐的首选治疗是什么？", "失眠的认知行为治疗（CBT-I）。"),
        },
    },
    {
        "key": "ankle_sprain", "acute": True,
        "en": {
            "name": "a sprained ankle", "system": "the musculoskeletal system",
            "defn": "an injury to the ligaments of the ankle, usually from rolling or twisting the foot",
            "cause": "It often happens during sports, on uneven ground or when landing awkwardly.",
            "symptoms": ["pain around the ankle", "swelling", "bruising", "difficulty putting weight on the foot"],
            "tests": ["a physical examination", "an X-ray if a fracture is suspected"],
            "care": ["rest the ankle", "apply ice wrapped in a cloth for 15 to 20 minutes at a time", "raise the foot and use a compression bandage"],
            "red": ["being unable to walk four steps", "an ankle that looks deformed", "numbness or a cold, pale foot"],
            "prevention": ["warm up before sport", "wear supportive footwear"],
            "course": "Mild sprains often heal within two to six weeks.",
            "note": "Gentle movement can usually start after a few days as pain allows.",
            "qa": ("How long should ice be applied to a sprained ankle at one time?", "15 to 20 minutes, wrapped in a cloth."),
        },
        "zh": {
            "name": "踝关节扭伤", "system": "肌肉骨骼系统",
            "defn": "踝关节韧带的损伤，通常因脚踝内翻或扭转引起",
            "cause": "常发生在运动中、走在不平的路面上或落地姿势不当时。",
            "symptoms": ["踝关节周围疼痛", "肿胀", "淤青", "脚难以承重"],
            "tests": ["体格检查", "X光检查（怀疑骨折时）"],
            "care": ["让脚踝休息", "用布包住冰袋冷敷，每次15到20分钟", "抬高患肢并用弹力绷带加压包扎"],
            "red": ["无法行走四步", "脚踝明显变形", "脚部麻木、发凉或苍白"],
            "prevention": ["运动前充分热身", "穿支撑性好的鞋"],
            "course": "轻度扭伤通常在两到六周内愈合。",
            "note": "疼痛允许时，通常几天后就可以开始轻柔活动。",
            "qa": ("踝关节扭伤每次冷敷多长时间？", "15到20分钟，冰袋要用布包住。"),
        },
    },
    {
        "key": "constipation", "acute": True,
        "en": {
            "name": "constipation", "system": "the digestive system",
            "defn": "having fewer bowel movements than usual or stools that are hard and difficult to pass",
            "cause": "Common causes include low fiber intake, not drinking enough fluids, inactivity and some medicines.",
            "symptoms": ["fewer than three bowel movements a week", "hard or lumpy stools", "straining", "a feeling of incomplete emptying"],
            "tests": ["a review of diet and medicines", "a physical examination"],
            "care": ["eat more fiber from fruit, vegetables and whole grains", "drink enough water", "stay physically active"],
            "red": ["blood in the stool", "unexplained weight loss", "severe abdominal pain or vomiting"],
            "prevention": ["eat a high-fiber diet", "keep a regular toilet routine"],
            "course": "It usually improves with diet and lifestyle changes.",
            "note": "Do not ignore the urge to go to the toilet.",
            "qa": ("How many bowel movements a week is usually considered constipation?", "Fewer than three."),
        },
        "zh": {
            "name": "便秘", "system": "消化系统",
            "defn": "排便次数比平时少，或大便干硬、难以排出",
            "cause": "常见原因包括膳食纤维摄入少、喝水不够、活动少和某些药物。",
            "symptoms": ["每周排便少于三次", "大便干硬或呈块状", "排便费力", "排便不尽感"],
            "tests": ["了解饮食及用药情况", "体格检查"],
            "care": ["多吃水果、蔬菜和全谷物等富含纤维的食物", "多喝水", "保持运动"],
            "red": ["大便带血", "不明原因的体重下降", "剧烈腹痛或呕吐"],
            "prevention": ["高纤维饮食", "养成规律的排便习惯"],
            "course": "通过调整饮食和生活方式通常可以改善。",
            "note": "有便意时不要忍着。",
            "qa": ("每周排便少于几次通常被认为是便秘？", "少于三次。"),
        },
    },
    {
        "key": "acute_bronchitis", "acute": True,
        "en": {
            "name": "acute bronchitis", "system": "the respiratory system",
            "defn": "a short-term inflammation of the airways in the lungs, often after a cold",
            "cause": "It is usually caused by viruses, so antibiotics are rarely needed.",
            "symptoms": ["a cough that may bring up mucus", "chest discomfort", "a mild fever", "tiredness"],
            "tests": ["a chest examination with a stethoscope", "a chest X-ray if pneumonia is suspected"],
            "care": ["rest", "drink plenty of fluids", "avoid smoke"],
            "red": ["shortness of breath", "a high fever", "coughing up blood"],
            "prevention": ["do not smoke", "wash your hands often"],
            "course": "Most people feel better within one to three weeks.",
            "note": "The cough can last for up to three weeks.",
            "qa": ("How long can the cough from acute bronchitis last?", "Up to about three weeks."),
        },
        "zh": {
            "name": "急性支气管炎", "system": "呼吸系统",
            "defn": "肺部气道的短期炎症，常发生在感冒之后",
            "cause": "通常由病毒引起，因此很少需要抗生素。",
            "symptoms": ["咳嗽或咳痰", "胸部不适", "低热", "乏力"],
            "tests": ["肺部听诊", "胸片检查（怀疑肺炎时）"],
            "care": ["多休息", "多喝水", "远离烟雾"],
            "red": ["呼吸急促", "高烧", "咳血"],
            "prevention": ["不吸烟", "勤洗手"],
            "course": "大多数人在一到三周内好转。",
            "note": "咳嗽可能持续长达三周。",
            "qa": ("急性支气管炎的咳嗽可能持续多久？", "最长可持续约三周。"),
        },
    },
    {
        "key": "hypothyroidism", "acute": False,
        "en": {
            "name": "an underactive thyroid (hypothyroidism)", "system": "the endocrine system",
            "defn": "a condition in which the thyroid gland does not make enough thyroid hormone",
            "cause": "A common cause is an autoimmune condition called Hashimoto's thyroiditis.",
            "symptoms": ["tiredness", "feeling cold", "weight gain", "dry skin"],
            "tests": ["a TSH blood test", "a free T4 blood test"],
            "care": ["take thyroid hormone replacement as prescribed", "have regular blood tests to adjust the dose", "take the tablet at the same time each day"],
            "red": ["extreme drowsiness or confusion", "a very slow heart rate", "a rapidly growing lump in the neck"],
            "prevention": ["get enough iodine through a normal diet", "have your thyroid checked if it runs in your family"],
            "course": "With treatment, most people feel well again within a few weeks to months.",
            "note": "Treatment is usually lifelong but very effective.",
            "qa": ("Which blood test is the main screening test for an underactive thyroid?", "The TSH test."),
        },
        "zh": {
            "name": "甲状腺功能减退症", "system": "内分泌系统",
            "defn": "甲状腺分泌的甲状腺激素不足的一种疾病",
            "cause": "常见原因是一种叫桥本甲状腺炎的自身免疫病。",
            "symptoms": ["乏力", "怕冷", "体重增加", "皮肤干燥"],
            "tests": ["促甲状腺激素（TSH）检测", "游离T4检测"],
            "care": ["按医嘱服用甲状腺激素替代药物", "定期抽血复查以调整剂量", "每天固定时间服药"],
            "red": ["极度嗜睡或意识模糊", "心率非常慢", "颈部肿块迅速增大"],
            "prevention": ["通过正常饮食摄入足够的碘", "有家族史时定期检查甲状腺"],
            "course": "经过治疗，大多数人在几周到几个月内恢复良好状态。",
            "note": "治疗通常需要终身进行，但效果很好。",
            "qa": ("筛查甲状腺功能减退症最主要的血液检查是什么？", "促甲状腺激素（TSH）检测。"),
        },
    },
    {
        "key": "osteoarthritis", "acute": False,
        "en": {
            "name": "osteoarthritis", "system": "the musculoskeletal system",
            "defn": "a joint condition in which the protective cartilage wears down over time",
            "cause": "It is linked to older age, previous joint injury, excess weight and repeated stress on the joint.",
            "symptoms": ["joint pain that is worse with activity", "stiffness, especially after rest", "reduced range of movement", "a grating feeling in the joint"],
            "tests": ["a physical examination", "an X-ray of the joint"],
            "care": ["do regular low-impact exercise such as walking or swimming", "keep a healthy weight", "use heat, cold or a common pain reliever for flare-ups"],
            "red": ["a hot, red, swollen joint with fever", "a sudden inability to use the joint", "severe pain at night that does not ease"],
            "prevention": ["keep a healthy weight", "protect your joints from injury"],
            "course": "It is long-term, but symptoms can often be managed well.",
            "note": "Exercise is one of the most effective treatments.",
            "qa": ("What type of exercise is recommended for osteoarthritis?", "Regular low-impact exercise such as walking or swimming."),
        },
        "zh": {
            "name": "骨关节炎", "system": "肌肉骨骼系统",
            "defn": "一种关节软骨随时间逐渐磨损的关节疾病",
            "cause": "与年龄增长、既往关节损伤、超重和关节反复受力有关。",
            "symptoms": ["活动后加重的关节疼痛", "休息后关节僵硬", "活动范围减小", "关节有摩擦感"],
            "tests": ["体格检查", "关节X光片"],
            "care": ["规律进行散步、游泳等低冲击运动", "保持健康体重", "发作时热敷、冷敷或服用常见止痛药"],
            "red": ["关节红肿发热并伴有发烧", "突然无法使用关节", "夜间剧痛且不能缓解"],
            "prevention": ["保持健康体重", "保护关节免受损伤"],
            "course": "这是一种长期疾病，但症状通常可以得到良好控制。",
            "note": "运动是最有效的治疗方法之一。",
            "qa": ("骨关节炎适合做什么样的运动？", "规律的低冲击运动，例如散步或游泳。"),
        },
    },
    {
        "key": "conjunctivitis", "acute": True,
        "en": {
            "name": "conjunctivitis (pink eye)", "system": "the eyes",
            "defn": "an inflammation of the thin layer covering the white of the eye and the inner eyelids",
            "cause": "It can be caused by viruses, bacteria or allergies.",
            "symptoms": ["red or pink eyes", "a gritty feeling", "watery or sticky discharge", "itching"],
            "tests": ["an eye examination", "a swab of the discharge in some cases"],
            "care": ["clean the eyelids with a clean, damp cloth", "avoid wearing contact lenses until it clears", "do not share towels"],
            "red": ["eye pain", "changes in vision", "strong sensitivity to light"],
            "prevention": ["wash your hands often", "avoid touching or rubbing your eyes"],
            "course": "Most cases clear within one to two weeks.",
            "note": "Infective conjunctivitis spreads easily, so wash your hands often.",
            "qa": ("Should you wear contact lenses while you have conjunctivitis?", "No. Avoid contact lenses until it clears."),
        },
        "zh": {
            "name": "结膜炎", "system": "眼睛",
            "defn": "覆盖眼白和眼睑内侧的薄膜发生的炎症",
            "cause": "可由病毒、细菌或过敏引起。",
            "symptoms": ["眼睛发红", "异物感", "流泪或有黏稠分泌物", "眼痒"],
            "tests": ["眼部检查", "分泌物化验（必要时）"],
            "care": ["用干净的湿毛巾清洁眼睑", "痊愈前不要戴隐形眼镜", "不要与他人共用毛巾"],
            "red": ["眼睛疼痛", "视力变化", "明显怕光"],
            "prevention": ["勤洗手", "避免揉眼睛"],
            "course": "大多数病例在一到两周内痊愈。",
            "note": "感染性结膜炎传染性强，要勤洗手。",
            "qa": ("得了结膜炎可以戴隐形眼镜吗？", "不可以。痊愈前不要戴隐形眼镜。"),
        },
    },
    {
        "key": "dehydration", "acute": True,
        "en": {
            "name": "dehydration", "system": "the whole body",
            "defn": "a state in which the body loses more fluid than it takes in",
            "cause": "It can result from diarrhea, vomiting, fever, heavy sweating or not drinking enough.",
            "symptoms": ["thirst", "dark yellow urine", "passing little urine", "dizziness or headache"],
            "tests": ["a physical examination", "blood tests in more severe cases"],
            "care": ["drink water or oral rehydration solution in small, frequent sips", "rest in a cool place", "avoid alcohol"],
            "red": ["confusion", "no urine for eight hours or more", "a fast heartbeat or fainting"],
            "prevention": ["drink regularly, especially in hot weather", "drink more when you have a fever or diarrhea"],
            "course": "Mild dehydration usually improves quickly once fluids are replaced.",
            "note": "Babies and older adults become dehydrated more quickly.",
            "qa": ("What is an easy sign of dehydration to check at home?", "Dark yellow urine or passing little urine."),
        },
        "zh": {
            "name": "脱水", "system": "全身",
            "defn": "身体丢失的水分多于摄入的水分的一种状态",
            "cause": "可由腹泻、呕吐、发热、大量出汗或饮水不足引起。",
            "symptoms": ["口渴", "尿色深黄", "尿量减少", "头晕或头痛"],
            "tests": ["体格检查", "血液检查（较重时）"],
            "care": ["少量多次地喝水或口服补液盐", "在阴凉处休息", "不要饮酒"],
            "red": ["意识模糊", "八小时以上没有排尿", "心跳很快或晕厥"],
            "prevention": ["经常喝水，尤其是天气炎热时", "发热或腹泻时多喝水"],
            "course": "轻度脱水在补充液体后通常很快好转。",
            "note": "婴儿和老年人更容易脱水。",
            "qa": ("在家怎样简单判断是否脱水？", "看尿色是否深黄、尿量是否减少。"),
        },
    },
    {
        "key": "gout", "acute": True,
        "en": {
            "name": "gout", "system": "the musculoskeletal system",
            "defn": "a type of arthritis caused by uric acid crystals building up in a joint",
            "cause": "It is linked to high uric acid levels, and alcohol, sugary drinks, red meat, seafood and some medicines raise the risk.",
            "symptoms": ["sudden, severe joint pain, often in the big toe", "a hot, swollen joint", "red or shiny skin over the joint", "pain that peaks within a day"],
            "tests": ["a uric acid blood test", "testing fluid taken from the joint"],
            "care": ["rest and raise the affected joint", "apply an ice pack wrapped in a cloth", "see a doctor for anti-inflammatory treatment"],
            "red": ["a fever with a hot, swollen joint", "several joints affected at once", "pain that does not improve after a few days of treatment"],
            "prevention": ["limit alcohol and sugary drinks", "keep a healthy weight"],
            "course": "An attack usually settles within one to two weeks.",
            "note": "Long-term medicine can lower uric acid and prevent attacks.",
            "qa": ("Which joint is most often affected in a gout attack?", "The big toe."),
        },
        "zh": {
            "name": "痛风", "system": "肌肉骨骼系统",
            "defn": "一种由尿酸盐结晶沉积在关节内引起的关节炎",
            "cause": "与尿酸偏高有关，饮酒、含糖饮料、红肉、海鲜和某些药物会增加风险。",
            "symptoms": ["大脚趾等关节突然剧痛", "关节红肿发热", "关节表面皮肤发红发亮", "疼痛在一天内达到高峰"],
            "tests": ["血尿酸检测", "关节液检查"],
            "care": ["休息并抬高患处", "用布包住冰袋冷敷", "就医接受抗炎治疗"],
            "red": ["关节红肿并伴有发热", "多个关节同时受累", "治疗几天后疼痛仍不缓解"],
            "prevention": ["限制饮酒和含糖饮料", "保持健康体重"],
            "course": "一次发作通常在一到两周内缓解。",
            "note": "长期用药可以降低尿酸、预防发作。",
            "qa": ("痛风发作最常累及哪个关节？", "大脚趾。"),
        },
    },
    {
        "key": "pharyngitis", "acute": True,
        "en": {
            "name": "a sore throat (pharyngitis)", "system": "the respiratory system",
            "defn": "an inflammation of the back of the throat",
            "cause": "Most sore throats are caused by viruses; a smaller number are caused by streptococcal bacteria.",
            "symptoms": ["throat pain", "pain when swallowing", "a scratchy or dry throat", "swollen neck glands"],
            "tests": ["a throat examination", "a rapid strep test or throat swab"],
            "care": ["drink warm fluids", "gargle with warm salt water", "use throat lozenges or a common pain reliever"],
            "red": ["difficulty breathing", "being unable to swallow liquids", "a sore throat lasting more than a week"],
            "prevention": ["wash your hands often", "avoid sharing cups and utensils"],
            "course": "Most viral sore throats get better within a week.",
            "note": "Antibiotics only help when the cause is bacterial.",
            "qa": ("Do antibiotics help most sore throats?", "No. Most sore throats are viral, and antibiotics only help bacterial infections."),
        },
        "zh": {
            "name": "咽炎", "system": "呼吸系统",
            "defn": "咽喉后部的炎症",
            "cause": "多数由病毒引起，少数由链球菌等细菌引起。",
            "symptoms": ["咽喉痛", "吞咽时疼痛", "咽喉干痒", "颈部淋巴结肿大"],
            "tests": ["咽部检查", "链球菌快速检测或咽拭子"],
            "care": ["多喝温水", "用温盐水漱口", "含润喉片或服用常见止痛药"],
            "red": ["呼吸困难", "无法咽下液体", "咽喉痛超过一周"],
            "prevention": ["勤洗手", "不与他人共用杯子和餐具"],
            "course": "大多数病毒性咽炎在一周内好转。",
            "note": "只有细菌引起时抗生素才有效。",
            "qa": ("大多数咽喉痛需要用抗生素吗？", "不需要。大多数咽喉痛由病毒引起，抗生素只对细菌感染有效。"),
        },
    },
    {
        "key": "kidney_stones", "acute": True,
        "en": {
            "name": "kidney stones", "system": "the urinary system",
            "defn": "hard deposits of minerals and salts that form inside the kidneys",
            "cause": "They are linked to not drinking enough water, a high-salt diet, excess weight and family history.",
            "symptoms": ["severe pain in the side or back", "pain that spreads to the lower abdomen or groin", "blood in the urine", "nausea"],
            "tests": ["a urine test", "an ultrasound or CT scan"],
            "care": ["drink plenty of water", "take a pain reliever as advised by a doctor", "strain your urine to catch the stone if asked to"],
            "red": ["fever and chills with the pain", "being unable to pass urine", "pain so severe you cannot keep fluids down"],
            "prevention": ["drink enough water to keep your urine pale", "limit salt"],
            "course": "Small stones often pass on their own within a few weeks.",
            "note": "Larger stones may need a procedure to break them up or remove them.",
            "qa": ("What is the simplest way to help prevent kidney stones?", "Drink enough water to keep urine pale."),
        },
        "zh": {
            "name": "肾结石", "system": "泌尿系统",
            "defn": "在肾脏内形成的由矿物质和盐类组成的坚硬沉积物",
            "cause": "与饮水不足、高盐饮食、超重和家族史有关。",
            "symptoms": ["腰部或侧腹剧烈疼痛", "疼痛放射到下腹部或腹股沟", "尿中带血", "恶心"],
            "tests": ["尿液检查", "超声或CT检查"],
            "care": ["多喝水", "按医生建议服用止痛药", "如医生要求，过滤尿液收集结石"],
            "red": ["疼痛伴发热和寒战", "无法排尿", "疼痛剧烈到喝不下水"],
            "prevention": ["多喝水，保持尿色清淡", "限制盐的摄入"],
            "course": "小结石常常在几周内自行排出。",
            "note": "较大的结石可能需要手术或碎石治疗。",
            "qa": ("预防肾结石最简单的方法是什么？", "多喝水，保持尿色清淡。"),
        },
    },
    {
        "key": "sinusitis", "acute": True,
        "en": {
            "name": "sinusitis", "system": "the respiratory system",
            "defn": "an inflammation of the sinuses, the air-filled spaces around the nose",
            "cause": "It usually follows a cold and is most often viral.",
            "symptoms": ["a blocked nose", "pain or pressure around the cheeks, eyes or forehead", "thick yellow or green nasal discharge", "a reduced sense of smell"],
            "tests": ["a review of symptoms", "an examination of the nose"],
            "care": ["rinse the nose with saline", "rest and drink fluids", "use warm compresses on the face"],
            "red": ["swelling or redness around the eyes", "a severe headache with a stiff neck", "changes in vision"],
            "prevention": ["treat allergies", "avoid smoke"],
            "course": "Most cases improve within two to three weeks.",
            "note": "Most cases clear up without antibiotics.",
            "qa": ("Do most cases of sinusitis need antibiotics?", "No. Most cases clear up without antibiotics."),
        },
        "zh": {
            "name": "鼻窦炎", "system": "呼吸系统",
            "defn": "鼻窦（鼻子周围充满空气的腔隙）的炎症",
            "cause": "通常发生在感冒之后，多数由病毒引起。",
            "symptoms": ["鼻塞", "面颊、眼周或前额疼痛或压迫感", "黄色或绿色的浓鼻涕", "嗅觉减退"],
            "tests": ["询问症状", "鼻腔检查"],
            "care": ["用生理盐水洗鼻", "多休息、多喝水", "面部热敷"],
            "red": ["眼周红肿", "剧烈头痛伴颈部僵硬", "视力变化"],
            "prevention": ["积极治疗过敏", "远离烟雾"],
            "course": "大多数病例在两到三周内好转。",
            "note": "大多数病例不用抗生素也能痊愈。",
            "qa": ("大多数鼻窦炎需要用抗生素吗？", "不需要。大多数病例不用抗生素也能痊愈。"),
        },
    },
    {
        "key": "depression", "acute": False,
        "en": {
            "name": "depression", "system": "mental health",
            "defn": "a common mental health condition marked by persistent low mood or loss of interest",
            "cause": "It can result from a mix of genetics, life events, stress, physical illness and brain chemistry.",
            "symptoms": ["low mood most of the day", "loss of interest in usual activities", "changes in sleep or appetite", "low energy"],
            "tests": ["a conversation with a doctor about mood and daily life", "a standard questionnaire"],
            "care": ["talk to a doctor or mental health professional", "stay connected with people you trust", "keep a daily routine with some physical activity"],
            "red": ["thoughts of suicide or self-harm", "being unable to eat, sleep or care for yourself", "hearing or seeing things others do not"],
            "prevention": ["keep regular sleep and exercise", "seek support early during stressful times"],
            "course": "With support and treatment, most people recover.",
            "note": "Talking therapies and, when needed, medicines are effective treatments.",
            "qa": ("What should someone do if they have thoughts of suicide?", "Seek help right away from emergency services, a crisis line or a doctor."),
        },
        "zh": {
            "name": "抑郁症", "system": "心理健康",
            "defn": "一种常见的心理健康问题，特点是持续的情绪低落或兴趣减退",
            "cause": "可能由遗传、生活事件、压力、躯体疾病和大脑化学物质等多种因素共同导致。",
            "symptoms": ["大部分时间情绪低落", "对平时喜欢的事情失去兴趣", "睡眠或食欲改变", "精力不足"],
            "tests": ["医生询问情绪及日常生活情况", "标准化问卷评估"],
            "care": ["与医生或心理健康专业人员交谈", "与信任的人保持联系", "保持规律作息并适量运动"],
            "red": ["有自杀或自伤的念头", "无法进食、睡眠或照顾自己", "听到或看到别人听不到、看不到的东西"],
            "prevention": ["保持规律的睡眠和运动", "在压力大时尽早寻求支持"],
            "course": "在支持和治疗下，大多数人可以康复。",
            "note": "心理治疗以及必要时的药物治疗都很有效。",
            "qa": ("有自杀念头时应该怎么办？", "立即寻求帮助，拨打急救电话、心理危机热线或联系医生。"),
        },
    },
    {
        "key": "anxiety", "acute": False,
        "en": {
            "name": "an anxiety disorder", "system": "mental health",
            "defn": "a condition in which worry or fear is strong, persistent and hard to control",
            "cause": "It can be linked to genetics, stress, difficult life events and other health conditions.",
            "symptoms": ["constant worry", "restlessness", "a racing heart", "trouble sleeping"],
            "tests": ["a conversation with a doctor about symptoms", "a standard questionnaire"],
            "care": ["practise slow breathing and relaxation", "limit caffeine and alcohol", "talk to a doctor about therapy options"],
            "red": ["chest pain or a racing heart that does not settle", "thoughts of self-harm", "being unable to leave home or work"],
            "prevention": ["exercise regularly", "keep a regular sleep pattern"],
            "course": "With treatment, symptoms usually improve a lot.",
            "note": "Cognitive behavioral therapy is an effective treatment.",
            "qa": ("Which talking therapy is effective for anxiety disorders?", "Cognitive behavioral therapy (CBT)."),
        },
        "zh": {
            "name": "焦虑症", "system": "心理健康",
            "defn": "一种担忧或恐惧强烈、持续且难以控制的疾病",
            "cause": "可能与遗传、压力、困难的生活事件和其他健康问题有关。",
            "symptoms": ["持续担忧", "坐立不安", "心跳加快", "睡眠困难"],
            "tests": ["医生询问症状", "标准化问卷评估"],
            "care": ["练习缓慢呼吸和放松", "减少咖啡因和酒精", "和医生讨论心理治疗等方案"],
            "red": ["胸痛或心跳加快持续不缓解", "有伤害自己的念头", "无法出门或无法工作"],
            "prevention": ["规律运动", "保持规律睡眠"],
            "course": "经过治疗，症状通常会明显改善。",
            "note": "认知行为治疗是一种有效的治疗方法。",
            "qa": ("哪种心理治疗对焦虑症有效？", "认知行为治疗（CBT）。"),
        },
    },
    {
        "key": "minor_burn", "acute": True,
        "en": {
            "name": "a minor burn", "system": "the skin",
            "defn": "damage to the top layer of skin from heat, such as hot water or a hot surface",
            "cause": "It is most often caused by hot liquids, steam, hot objects or brief contact with flames.",
            "symptoms": ["red skin", "pain", "mild swelling", "small blisters"],
            "tests": ["an examination of the size and depth of the burn", "a check of tetanus vaccination status"],
            "care": ["cool the burn under cool running water for 20 minutes", "cover it loosely with a clean, non-stick dressing", "leave blisters unbroken"],
            "red": ["a burn larger than the palm of the hand", "burns on the face, hands, feet or genitals", "white, leathery or charred skin"],
            "prevention": ["keep hot drinks away from children", "turn pan handles away from the edge of the stove"],
            "course": "Minor burns usually heal within one to two weeks.",
            "note": "Do not put ice, butter or toothpaste on a burn.",
            "qa": ("How long should a minor burn be cooled under running water?", "About 20 minutes."),
        },
        "zh": {
            "name": "轻度烫伤", "system": "皮肤",
            "defn": "热水或高温物体等造成的皮肤表层损伤",
            "cause": "最常见的原因是热液体、蒸汽、高温物体或短暂接触火焰。",
            "symptoms": ["皮肤发红", "疼痛", "轻微肿胀", "小水疱"],
            "tests": ["烫伤面积与深度的评估", "破伤风疫苗接种情况核查"],
            "care": ["用凉的流动水冲洗烫伤处20分钟", "用干净、不粘的敷料轻轻覆盖", "不要弄破水疱"],
            "red": ["烫伤面积大于手掌", "烫伤位于面部、手、脚或会阴部", "皮肤发白、呈皮革样或焦黑"],
            "prevention": ["热饮放在儿童够不到的地方", "锅把手朝向灶台内侧"],
            "course": "轻度烫伤通常在一到两周内愈合。",
            "note": "不要在烫伤处涂冰块、黄油或牙膏。",
            "qa": ("轻度烫伤应该用流动的凉水冲多久？", "大约20分钟。"),
        },
    },
    {
        "key": "heat_exhaustion", "acute": True,
        "en": {
            "name": "heat exhaustion", "system": "the whole body",
            "defn": "a heat-related illness that happens when the body overheats and loses too much water and salt",
            "cause": "It usually follows exercise or work in hot, humid weather without enough fluids.",
            "symptoms": ["heavy sweating", "dizziness", "nausea", "headache"],
            "tests": ["a physical examination", "a temperature check"],
            "care": ["move to a cool place", "lie down and raise the legs", "drink water or a sports drink"],
            "red": ["confusion", "a temperature of 40°C or higher", "no improvement after 30 minutes of cooling"],
            "prevention": ["drink plenty of fluids in hot weather", "avoid hard exercise in the hottest part of the day"],
            "course": "Most people recover quickly with rest, cooling and fluids.",
            "note": "Symptoms should improve within 30 minutes of cooling down.",
            "qa": ("With heat illness, which body temperature is an emergency?", "40°C or higher, especially with confusion."),
        },
        "zh": {
            "name": "热衰竭", "system": "全身",
            "defn": "身体过热并丢失过多水分和盐分时发生的一种中暑类疾病",
            "cause": "通常发生在炎热潮湿的天气中运动或劳动而补水不足时。",
            "symptoms": ["大量出汗", "头晕", "恶心", "头痛"],
            "tests": ["体格检查", "测量体温"],
            "care": ["转移到阴凉处", "躺下并抬高双腿", "喝水或运动饮料"],
            "red": ["意识模糊", "体温达到40°C或更高", "降温30分钟后仍无好转"],
            "prevention": ["天热时多喝水", "避免在一天中最热的时候剧烈活动"],
            "course": "大多数人经过休息、降温和补水后很快恢复。",
            "note": "降温后30分钟内症状应该好转。",
            "qa": ("中暑类疾病时体温达到多少属于紧急情况？", "40°C或更高，尤其是伴有意识模糊时。"),
        },
    },
]

# ---------------------------------------------------------------------------
# Building blocks: glossaries (used only in the pretraining corpus)
# ---------------------------------------------------------------------------

GLOSSARY = {
    "en": [
        # symptoms
        "A fever is a body temperature of 38°C or higher. It is usually a sign that the body is fighting an infection.",
        "A cough is a reflex that clears the airways. Most coughs after a cold settle within three weeks; a cough lasting longer should be checked by a doctor.",
        "A headache is pain in any part of the head. Most headaches are not serious, but a sudden, severe headache needs urgent medical care.",
        "Dizziness is a feeling of being light-headed or unsteady. It is often caused by dehydration or standing up quickly, but fainting should be checked by a doctor.",
        "Fatigue is ongoing tiredness that does not improve with rest. It can be linked to poor sleep, anemia, thyroid problems or low mood.",
        "Chest pain has many causes, from strained muscles to heart disease. Sudden, crushing or spreading chest pain needs emergency care.",
        "Shortness of breath is difficulty getting enough air. Breathlessness at rest or with blue lips is an emergency.",
        "Abdominal pain is pain anywhere between the chest and the groin. Severe or worsening pain, especially with fever or vomiting, should be checked promptly.",
        "Diarrhea means loose or watery stools three or more times a day. The main risk is dehydration, so fluids are important.",
        "Nausea is a sick feeling in the stomach that may come before vomiting. Small sips of fluid and bland food often help.",
        "A rash is a change in the color or texture of the skin. A rash with fever, or one that does not fade when pressed, needs urgent care.",
        "Palpitations are the feeling that the heart is racing, pounding or skipping beats. They are often harmless, but palpitations with chest pain or fainting need urgent care.",
        "Itching is an irritating sensation that makes you want to scratch. Dry skin, eczema and allergies are common causes.",
        "Swollen lymph nodes are often a sign that the body is fighting an infection. Nodes that keep growing or last more than a few weeks should be checked.",
        "Heartburn is a burning feeling behind the breastbone after eating. It is a common symptom of acid reflux.",
        # tests
        "A complete blood count (CBC) measures red cells, white cells and platelets. It can help detect anemia and infection.",
        "The HbA1c test shows the average blood sugar level over the past two to three months. It is used to diagnose and monitor diabetes.",
        "A fasting blood glucose test measures blood sugar after at least eight hours without food. It is used to check for diabetes.",
        "The TSH test measures thyroid-stimulating hormone in the blood. A high TSH level usually suggests an underactive thyroid.",
        "Spirometry measures how much air a person can breathe out and how fast. It is the main breathing test for asthma and other lung conditions.",
        "A peak flow meter measures how fast you can blow air out. People with asthma can use it at home to track their airways.",
        "A urine dipstick test uses a chemical strip to look for signs of infection, blood, sugar or protein in the urine.",
        "A urine culture grows bacteria from a urine sample. It confirms a urinary tract infection and shows which antibiotic will work.",
        "Blood pressure is measured with an inflatable cuff on the upper arm. A reading is given as two numbers, such as 120/80 mmHg.",
        "An X-ray uses a small dose of radiation to take pictures of bones and the chest. It can show fractures and pneumonia.",
        "An ultrasound scan uses sound waves to create pictures of organs such as the kidneys and liver. It does not use radiation.",
        "An electrocardiogram (ECG) records the electrical activity of the heart. It helps detect heart rhythm problems and heart attacks.",
        "An endoscopy uses a thin, flexible tube with a camera to look inside the food pipe and stomach.",
        "A rapid strep test uses a throat swab to check for streptococcal bacteria within minutes.",
        "A ferritin test measures the body's iron stores. A low ferritin level suggests iron deficiency.",
        "A CT scan uses X-rays and a computer to create detailed cross-section images of the body.",
        # treatments and self-care
        "Oral rehydration solution is a mix of water, salts and sugar. It replaces fluid lost through diarrhea and vomiting better than plain water.",
        "Saline nasal sprays and rinses wash mucus and allergens out of the nose. They are safe to use several times a day.",
        "Antibiotics treat infections caused by bacteria. They do not work against viruses such as colds and flu, and a prescribed course should be finished.",
        "Paracetamol (acetaminophen) is a common over-the-counter medicine for pain and fever. Follow the label and never exceed the stated maximum daily amount.",
        "Ibuprofen is an anti-inflammatory pain reliever. It is best taken with food and may not be suitable for people with stomach ulcers, kidney disease or some heart conditions.",
        "Antihistamines reduce allergy symptoms such as sneezing and itching. Some types can cause drowsiness.",
        "Reliever inhalers open the airways quickly during asthma symptoms, while preventer inhalers reduce airway inflammation when used every day.",
        "Antacids neutralize stomach acid and give quick relief from occasional heartburn.",
        "Cognitive behavioral therapy (CBT) is a talking therapy that helps people change unhelpful thoughts and habits. It is effective for anxiety, depression and insomnia.",
        "Emollients are moisturizers that soothe dry skin and protect the skin barrier. They are the basis of eczema care.",
        "Vaccines train the immune system to recognize an infection. A yearly flu vaccine lowers the risk of flu and its complications.",
        "Regular physical activity lowers blood pressure, improves blood sugar control, strengthens joints and supports mood.",
        "Cold compresses reduce swelling after an injury. Ice should be wrapped in a cloth and applied for 15 to 20 minutes at a time.",
    ],
    "zh": [
        "发热是指体温达到38°C或更高，通常说明身体正在对抗感染。",
        "咳嗽是清理气道的一种反射。感冒后的咳嗽多在三周内好转，持续更久应就医检查。",
        "头痛是头部任何部位的疼痛。大多数头痛并不严重，但突然出现的剧烈头痛需要紧急就医。",
        "头晕是一种头重脚轻或站立不稳的感觉，常与脱水或突然站起有关，出现晕厥应就医检查。",
        "乏力是指休息后也不能缓解的持续疲倦，可能与睡眠不足、贫血、甲状腺问题或情绪低落有关。",
        "胸痛的原因很多，从肌肉拉伤到心脏病都有可能。突然出现的压榨性或放射性胸痛需要紧急就医。",
        "气短是指呼吸费力、吸不够气。静息时气促或嘴唇发青属于紧急情况。",
        "腹泻是指每天排稀便或水样便三次以上，主要风险是脱水，因此补充液体很重要。",
        "皮疹是皮肤颜色或质地的改变。伴有发热或按压不褪色的皮疹需要紧急就医。",
        "心悸是感觉心跳过快、过重或漏跳，多数无害，但伴有胸痛或晕厥时需要紧急就医。",
        "烧心是饭后胸骨后方的烧灼感，是胃食管反流的常见症状。",
        "血常规检查可测量红细胞、白细胞和血小板，有助于发现贫血和感染。",
        "糖化血红蛋白（HbA1c）反映过去两到三个月的平均血糖水平，用于诊断和监测糖尿病。",
        "促甲状腺激素（TSH）检测用于评估甲状腺功能，TSH升高通常提示甲状腺功能减退。",
        "肺功能检查测量一个人能呼出多少气、呼出多快，是诊断哮喘的主要检查。",
        "尿常规试纸检测用化学试纸检查尿液中是否有感染、血、糖或蛋白的迹象。",
        "血压用绑在上臂的袖带测量，结果用两个数字表示，例如120/80毫米汞柱。",
        "X光检查用小剂量射线拍摄骨骼和胸部的图像，可以发现骨折和肺炎。",
        "超声检查利用声波生成肾脏、肝脏等器官的图像，没有辐射。",
        "心电图记录心脏的电活动，有助于发现心律失常和心肌梗死。",
        "胃镜检查用一根带摄像头的细软管观察食管和胃的内部。",
        "口服补液盐是水、盐和糖的混合物，补充腹泻和呕吐丢失的液体比白开水效果更好。",
        "生理盐水喷鼻或洗鼻可以冲走鼻腔里的黏液和过敏原，一天可以使用多次。",
        "抗生素用于治疗细菌感染，对感冒和流感等病毒感染无效，医生开的疗程应按时服完。",
        "对乙酰氨基酚是一种常见的非处方退热止痛药，应按说明书使用，不要超过每日最大用量。",
        "布洛芬是一种抗炎止痛药，最好饭后服用，胃溃疡、肾病或某些心脏病患者可能不适合使用。",
        "抗组胺药可以减轻打喷嚏、瘙痒等过敏症状，有些种类会让人犯困。",
        "哮喘的缓解药能迅速扩张气道，控制药需要每天使用以减轻气道炎症。",
        "认知行为治疗是一种心理治疗，帮助人们改变不利的想法和习惯，对焦虑、抑郁和失眠都有效。",
        "保湿霜可以缓解皮肤干燥并保护皮肤屏障，是湿疹护理的基础。",
        "每年接种流感疫苗可以降低感染流感及其并发症的风险。",
        "规律运动可以降低血压、改善血糖控制、增强关节并改善情绪。",
        "冷敷可以减轻受伤后的肿胀，冰袋应用布包住，每次敷15到20分钟。",
    ],
}

# ---------------------------------------------------------------------------
# Small text helpers
# ---------------------------------------------------------------------------


def cap(s):
    return s[:1].upper() + s[1:]


def join_list(items, lang, conj=None):
    items = list(items)
    if lang == "zh":
        conj = conj or "和"
        if len(items) == 1:
            return items[0]
        return "、".join(items[:-1]) + conj + items[-1]
    conj = conj or "and"
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} {conj} {items[1]}"
    return ", ".join(items[:-1]) + f", {conj} " + items[-1]


def join_or(items, lang):
    return join_list(items, lang, "或" if lang == "zh" else "or")


def join_verbs(items, lang):
    """Lists of actions: "a, b, and c" / "甲，乙，丙"."""
    if lang == "zh":
        return "，".join(items)
    return join_list(items, lang)


def join_red(items, lang):
    """Red-flag lists: "a, b, or c" / "甲、乙等情况"."""
    if lang == "zh":
        return "、".join(items) + "等情况"
    if len(items) == 2 and any(" or " in i or "," in i for i in items):
        return f"{items[0]}, or {items[1]}"
    return join_or(items, lang)


CRISIS = {
    "en": "If you have thoughts of self-harm, contact emergency services or a crisis line now.",
    "zh": "如果有伤害自己的念头，请立即拨打急救电话或心理危机热线。",
}
CRISIS_WORDS = ("self-harm", "suicide", "自杀", "自伤", "伤害自己")


def crisis(items, lang):
    """Extra sentence whenever a listed red flag is about self-harm."""
    if any(w in r for r in items for w in CRISIS_WORDS):
        return ("" if lang == "zh" else " ") + CRISIS[lang]
    return ""


def third(text):
    """Second person -> third person, for 'the patient was advised to ...'."""
    for a, b in (("your ", "their "), ("you ", "they "), (" you.", " them.")):
        text = text.replace(a, b)
    return text


COND_MARKERS = (" if ", " in some cases", " in more severe cases", " only ", "（")


def plain_tests(d):
    """Tests without conditions attached ("an X-ray if ..." is left out)."""
    out = [t for t in d["tests"] if not any(m in t for m in COND_MARKERS)]
    return out or d["tests"][:1]


def subj(sentence, name):
    """Replace a leading 'It'/'They' with the condition name (English only)."""
    for pron in ("It ", "They "):
        if sentence.startswith(pron):
            return cap(name) + " " + sentence[len(pron):]
    return sentence


def pick(rng, items, k):
    """k items from a list, kept in their canonical order."""
    k = min(k, len(items))
    idx = sorted(rng.sample(range(len(items)), k))
    return [items[i] for i in idx]


def lang_plan(n, rng):
    n_zh = round(n * ZH_SHARE)
    plan = ["zh"] * n_zh + ["en"] * (n - n_zh)
    rng.shuffle(plan)
    return plan


RELATIVES = {
    "en": ["mother", "father", "husband", "wife", "son", "daughter", "grandmother",
           "grandfather", "sister", "brother", "partner", "friend"],
    "en_pron": {"mother": "she has", "wife": "she has", "daughter": "she has", "grandmother": "she has",
                "sister": "she has", "father": "he has", "husband": "he has", "son": "he has",
                "grandfather": "he has", "brother": "he has", "partner": "they have", "friend": "they have"},
    "zh": ["妈妈", "爸爸", "丈夫", "妻子", "儿子", "女儿", "奶奶", "爷爷", "姐姐", "哥哥", "朋友"],
}

SYSTEM_PROMPTS = {
    "en": [
        "You are a helpful medical assistant. Give clear, general health information and recommend seeing a doctor when symptoms are serious.",
        "You are a careful health information assistant. Answer briefly and remind the user that you do not replace a doctor.",
        "You are a friendly assistant for patient questions. Be accurate, concise and safe.",
    ],
    "zh": [
        "你是一名专业、谨慎的医疗助手，请用简洁的语言提供一般健康信息，并在必要时建议就医。",
        "你是一名健康咨询助手，回答要准确、简短、安全，不能代替医生的诊断。",
    ],
}

# ---------------------------------------------------------------------------
# Questions and answers
# ---------------------------------------------------------------------------

QTYPES = ["what", "symptoms", "diagnosis", "treatment", "when_doctor", "prevention",
          "symptom_based", "diagnosed", "relative", "cause", "course", "system"]

QUESTIONS = {
    "en": {
        "what": ["What is {name}?", "Can you explain what {name} is?", "Tell me briefly about {name}.",
                 "I keep hearing about {name}. What is it?"],
        "symptoms": ["What are the symptoms of {name}?", "How do I know if I have {name}?",
                     "What are the common signs of {name}?", "Which symptoms does {name} usually cause?"],
        "diagnosis": ["How is {name} diagnosed?", "What tests are used for {name}?",
                      "How will a doctor check for {name}?"],
        "treatment": ["How is {name} treated?", "What can I do at home for {name}?",
                      "What is the best way to manage {name}?", "How can I feel better if I have {name}?"],
        "when_doctor": ["When should I see a doctor about {name}?",
                        "What warning signs of {name} need medical attention?",
                        "When is {name} an emergency?"],
        "prevention": ["How can I prevent {name}?", "How can I lower my risk of {name}?",
                       "Is there anything I can do to avoid {name}?"],
        "symptom_based": ["My symptoms are {syms}. What could be causing this?",
                          "I've been having {syms}. What might this be?",
                          "{when} I've noticed {syms}. Should I be worried?"],
        "diagnosed": ["I was just diagnosed with {name}. What should I do?",
                      "My doctor says I have {name}. How can I look after myself?"],
        "relative": ["My {rel} has {name}. When should we worry?",
                     "My {rel} was told {pron} {name}. What warning signs should we watch for?"],
        "cause": ["What causes {name}?", "Why do people get {name}?", "What increases the risk of {name}?"],
        "course": ["How long does it take to recover from {name}?", "What is the usual course of {name}?",
                   "Does {name} go away on its own?"],
        "system": ["Which part of the body does {name} affect?", "What body system is involved in {name}?"],
    },
    "zh": {
        "what": ["什么是{name}？", "{name}是什么病？", "请简单介绍一下{name}。", "经常听人说{name}，它到底是什么？"],
        "symptoms": ["{name}有哪些症状？", "{name}的常见症状是什么？", "怎么知道自己是不是得了{name}？"],
        "diagnosis": ["{name}怎么诊断？", "怀疑{name}需要做什么检查？", "医生一般怎样确诊{name}？"],
        "treatment": ["{name}应该怎么处理？", "得了{name}在家可以做些什么？", "{name}怎么治疗比较好？"],
        "when_doctor": ["{name}什么情况下需要去医院？", "{name}出现哪些情况要及时就医？"],
        "prevention": ["如何预防{name}？", "怎样降低得{name}的风险？"],
        "symptom_based": ["我最近出现了{syms}，这可能是什么问题？", "{when}我出现了{syms}，是怎么回事？",
                          "我有{syms}，需要担心吗？"],
        "diagnosed": ["我被诊断为{name}，接下来该怎么办？", "医生说我得了{name}，平时要注意什么？"],
        "relative": ["我{rel}得了{name}，什么时候需要担心？", "我{rel}被诊断为{name}，我们要注意哪些危险信号？"],
        "cause": ["{name}是什么原因引起的？", "为什么会得{name}？"],
        "course": ["{name}一般多久能好？", "{name}的病程一般是怎样的？", "{name}会自己好吗？"],
        "system": ["{name}主要影响身体的哪个部位？", "{name}属于哪个系统的问题？"],
    },
}

FOLLOWUPS = {
    "en": {
        "treatment": ["What can I do about it at home?", "How is it treated?"],
        "when_doctor": ["When should I see a doctor?", "What warning signs should I watch for?"],
        "prevention": ["How can I prevent it in the future?", "Can I lower my risk of getting it again?"],
        "course": ["How long will it last?", "Will it go away on its own?"],
        "diagnosis": ["How would a doctor confirm it?", "Do I need any tests?"],
    },
    "zh": {
        "treatment": ["那在家可以怎么处理？", "一般怎么治疗？"],
        "when_doctor": ["什么情况下需要去医院？", "要注意哪些危险信号？"],
        "prevention": ["以后怎么预防？"],
        "course": ["一般多久能好？"],
        "diagnosis": ["医生会怎么确诊？", "需要做什么检查吗？"],
    },
}


def ask(c, qtype, lang, rng, template=None):
    d = c[lang]
    tpls = QUESTIONS[lang][qtype]
    t = template if template is not None else rng.choice(tpls)
    if lang == "en":
        when = "For a few days" if c["acute"] else "For several weeks"
    else:
        when = "这几天" if c["acute"] else "这几周"
    syms = pick(rng, d["symptoms"], 3 if len(d["symptoms"]) > 3 else len(d["symptoms"]))
    rel = rng.choice(RELATIVES[lang])
    pron = RELATIVES["en_pron"].get(rel, "")
    return t.format(name=d["name"], syms=join_list(syms, lang), when=when, rel=rel, pron=pron)


def red_sentence(d, lang, rng, k=2):
    reds = pick(rng, d["red"], k)
    if lang == "zh":
        return f"如果出现{join_red(reds, 'zh')}，应及时就医。" + crisis(reds, lang)
    return f"See a doctor promptly if you notice {join_red(reds, 'en')}." + crisis(reds, lang)


def answer(c, qtype, lang, rng):
    """Good (reference) answer, kept under MAX_ANSWER_CHARS (re-drawn if too long)."""
    for _ in range(20):
        text = _answer(c, qtype, lang, rng)
        if len(text) < MAX_ANSWER_CHARS:
            return text
    raise ValueError(f"no short enough answer for {c['key']}/{qtype}/{lang}")


def _answer(c, qtype, lang, rng):
    """Facts come only from the condition entry."""
    d = c[lang]
    n, N = d["name"], cap(d["name"])
    syms_all = join_list(d["symptoms"], lang)
    care_all = join_verbs(d["care"], lang)
    reds_all = join_red(d["red"], lang)
    crisis_all = crisis(d["red"], lang)
    v = rng.randrange(3)
    if lang == "en":
        if qtype == "what":
            return [f"{N} is {d['defn']}. {d['cause']}",
                    f"{N} is {d['defn']}. It mainly affects {d['system']}. {d['course']}",
                    f"{N} is {d['defn']}. Common symptoms include {join_list(pick(rng, d['symptoms'], 2), 'en')}. "
                    + red_sentence(d, lang, rng)][v]
        if qtype == "symptoms":
            if c.get("silent"):
                return (f"{d['symptom_note']} When it is very high, it may cause {join_or(d['symptoms'], 'en')}. "
                        + red_sentence(d, lang, rng))
            if v == 0:
                return f"Common symptoms of {n} include {syms_all}. " + red_sentence(d, lang, rng)
            return f"{N} often causes {syms_all}. " + red_sentence(d, lang, rng)
        if qtype == "diagnosis":
            if v == 0:
                return f"To check for {n}, a doctor may use {join_list(d['tests'], 'en')}."
            return (f"{N} is usually diagnosed with {join_list(d['tests'], 'en')}. "
                    "The doctor will also consider your symptoms and general health.")
        if qtype == "treatment":
            if v == 0:
                return (f"Most people with {n} are advised to {third(care_all)}. "
                        + red_sentence(d, lang, rng))
            return f"For {n}, it usually helps to {care_all}. {d['note']}"
        if qtype == "when_doctor":
            if v == 0:
                return f"With {n}, see a doctor quickly if there are warning signs such as {reds_all}." + crisis_all
            return (f"Seek medical care promptly if you notice {reds_all}. "
                    "If symptoms are sudden or severe, call emergency services." + crisis_all)
        if qtype == "prevention":
            prev = join_verbs(d["prevention"], "en")
            if v == 0:
                return f"To lower the risk of {n}, {prev}."
            return f"You can reduce your risk of {n} if you {prev}. {subj(d['cause'], n)}"
        if qtype == "symptom_based":
            care2 = join_verbs(pick(rng, d["care"], 2), "en")
            reds = pick(rng, d["red"], 2)
            if v == 0:
                return (f"These symptoms can be caused by {n}, although other conditions are possible and a doctor "
                        f"can confirm it. Meanwhile, it may help to {care2}. "
                        f"See a doctor promptly if you notice {join_red(reds, 'en')}." + crisis(reds, lang))
            return (f"This pattern often fits {n}, but only a doctor can confirm the cause. It usually helps to "
                    f"{care2}. Seek medical care promptly if you notice {join_red(reds, 'en')}." + crisis(reds, lang))
        if qtype == "diagnosed":
            if v == 0:
                return f"Follow your doctor's plan and {care_all}. " + red_sentence(d, lang, rng)
            return f"With {n}, it usually helps to {care_all}. {d['note']} " + red_sentence(d, lang, rng)
        if qtype == "relative":
            return (f"Watch for warning signs such as {reds_all}. If any of these appear, get medical help promptly."
                    + crisis_all + f" {subj(d['course'], n)}")
        if qtype == "cause":
            if v == 0:
                return f"{N} is {d['defn']}. {d['cause']}"
            return f"{subj(d['cause'], n)} {d['note']}"
        if qtype == "course":
            if v == 0:
                return f"{subj(d['course'], n)} {d['note']}"
            return f"{subj(d['course'], n)} " + red_sentence(d, lang, rng)
        if qtype == "system":
            if v == 0:
                return f"{N} mainly affects {d['system']}. It is {d['defn']}."
            return f"{N} is {d['defn']}, so it mainly affects {d['system']}."
    else:
        if qtype == "what":
            return [f"{n}是{d['defn']}。{d['cause']}",
                    f"{n}是{d['defn']}，主要影响{d['system']}。{d['course']}",
                    f"{n}是{d['defn']}。常见症状包括{join_list(pick(rng, d['symptoms'], 2), 'zh')}。"
                    + red_sentence(d, lang, rng)][v]
        if qtype == "symptoms":
            if c.get("silent"):
                return (f"{d['symptom_note']}血压很高时可能出现{join_or(d['symptoms'], 'zh')}。"
                        + red_sentence(d, lang, rng))
            return f"{n}的常见症状包括{syms_all}。" + red_sentence(d, lang, rng)
        if qtype == "diagnosis":
            if v == 0:
                return f"医生可能会通过{join_list(d['tests'], 'zh')}来判断是否为{n}。"
            return f"{n}通常通过{join_list(d['tests'], 'zh')}来诊断，医生还会结合你的症状和整体健康情况。"
        if qtype == "treatment":
            if v == 0:
                return f"对于{n}，一般建议{care_all}。" + red_sentence(d, lang, rng)
            return f"对于{n}，一般建议{care_all}。{d['note']}"
        if qtype == "when_doctor":
            return f"如果出现{reds_all}，应尽快就医；症状突然加重或非常严重时，请立即拨打急救电话。" + crisis_all
        if qtype == "prevention":
            return f"预防{n}可以做到：{join_verbs(d['prevention'], 'zh')}。"
        if qtype == "symptom_based":
            care2 = join_verbs(pick(rng, d["care"], 2), "zh")
            reds = pick(rng, d["red"], 2)
            return (f"这些症状可能是{n}引起的，但也可能有其他原因，最好由医生确认。一般可以{care2}；"
                    f"如果出现{join_red(reds, 'zh')}，应及时就医。" + crisis(reds, lang))
        if qtype == "diagnosed":
            if v == 0:
                return f"请按照医生的方案治疗，平时{care_all}。" + red_sentence(d, lang, rng)
            return f"得了{n}，一般建议{care_all}。{d['note']}" + red_sentence(d, lang, rng)
        if qtype == "relative":
            return f"要注意{'、'.join(d['red'])}等危险信号，一旦出现应及时就医。" + crisis_all + d["course"]
        if qtype == "cause":
            if v == 0:
                return f"{n}是{d['defn']}。{d['cause']}"
            return f"{n}{d['cause']}{d['note']}"
        if qtype == "course":
            if v == 0:
                return f"{d['course']}{d['note']}"
            return d["course"] + red_sentence(d, lang, rng)
        if qtype == "system":
            return f"{n}主要影响{d['system']}。它是{d['defn']}。"
    raise ValueError(qtype)


def has_red_flag(text, d):
    return any(r in text for r in d["red"])


def safe_answer(c, qtype, lang, rng):
    """Answer that always names red-flag signs that need a doctor."""
    a = answer(c, qtype, lang, rng)
    if not has_red_flag(a, c[lang]):
        extra = red_sentence(c[lang], lang, rng)
        if len(a) + len(extra) + 1 < MAX_ANSWER_CHARS:
            a = a + ("" if lang == "zh" else " ") + extra
    return a

# ---------------------------------------------------------------------------
# Rejected (worse) answers for preference data
# ---------------------------------------------------------------------------

REJECT = {
    "en": {
        "dismissive": [
            "{N} is never serious. Just ignore it and it will go away on its own.",
            "Don't worry about {name}. There is no need to see a doctor, even if it gets worse.",
            "It's nothing. Everyone gets {name} sometimes, so carry on as normal and ignore the symptoms.",
            "Honestly, {name} is all in your head. Stop worrying and don't waste a doctor's time.",
        ],
        "unsafe": [
            "Take any leftover antibiotics you have at home; that cures {name} quickly.",
            "For {name}, stop any medicines your doctor prescribed and try a few days of fasting instead.",
            "Borrow a friend's prescription medicine for {name}; it is basically the same as seeing a doctor.",
            "Take several different painkillers together at the highest amount you can; more medicine fixes {name} faster.",
            "The best way to deal with {name} is to push through it, drink as little as possible and skip rest.",
        ],
        "unhelpful": ["It depends.", "I don't know. Search the internet.", "Maybe. Hard to say.",
                      "Ask someone else.", "Lots of things could be going on."],
        "off_topic": [
            "The weather will be sunny this weekend, so it's a good time for a picnic.",
            "Our shop is open from nine to five on weekdays.",
            "Here is a recipe idea: fried rice with eggs and vegetables.",
            "My favourite football team won last night.",
            "Did you know that octopuses have three hearts?",
        ],
        "wrong": "{N} is {odefn}. It is best handled if you {ocare}, and there is no need to see a doctor.",
    },
    "zh": {
        "dismissive": [
            "{name}根本不严重，别管它，自己就会好。",
            "得了{name}不用担心，就算加重了也没必要去医院。",
            "{name}谁都会得，照常生活就行，不用理会这些症状。",
            "{name}都是心理作用，别想太多，也别去麻烦医生。",
        ],
        "unsafe": [
            "把家里剩下的抗生素拿来吃就行，{name}很快就能好。",
            "得了{name}就把医生开的药停掉，改成饿几天肚子。",
            "借朋友的处方药吃一吃，治{name}和看医生一样。",
            "几种止痛药一起吃、吃到最大量，{name}好得更快。",
            "对付{name}就是硬扛，尽量少喝水，也不用休息。",
        ],
        "unhelpful": ["看情况吧。", "不知道，自己上网查。", "说不好。", "问别人吧。"],
        "off_topic": [
            "这个周末天气晴朗，适合去野餐。",
            "我们店工作日早九点到晚五点营业。",
            "推荐一道菜：鸡蛋蔬菜炒饭。",
            "昨晚我喜欢的球队赢了。",
        ],
        "wrong": "{name}是{odefn}。最好的处理方法是{ocare}，不用去看医生。",
    },
}

REJECT_KINDS = ["dismissive"] * 30 + ["unsafe"] * 22 + ["wrong"] * 13 + ["unhelpful"] * 12 + \
               ["truncated"] * 11 + ["off_topic"] * 12


def rejected_answer(c, lang, chosen, rng, kind=None):
    d = c[lang]
    kind = kind or rng.choice(REJECT_KINDS)
    R = REJECT[lang]
    if kind == "truncated":
        cut = max(8, int(len(chosen) * rng.uniform(0.2, 0.4)))
        text = chosen[:cut].rstrip(" ,，、")
        if lang == "en" and " " in text:
            text = text[: text.rfind(" ")]  # cut at a word boundary, mid-sentence
        return kind, text
    if kind == "wrong":
        other = rng.choice([o for o in CONDITIONS if o["key"] != c["key"]])
        ocare = [x for x in other[lang]["care"] if "doctor" not in x and "医" not in x]
        return kind, R["wrong"].format(N=cap(d["name"]), name=d["name"], odefn=other[lang]["defn"],
                                       ocare=ocare[0])
    t = rng.choice(R[kind])
    return kind, t.format(N=cap(d["name"]), name=d["name"])

# Length-matched rejections: an answer that reads like the chosen one (an accurate or a wrong
# opening sentence) followed by bad advice, so the pair differs in content, not in length.
BAD_ADVICE = {
    "en": [
        "There is no need to see a doctor, even if you notice {reds}.",
        "{N} always clears up on its own, so ignore any warning signs.",
        "Take any leftover antibiotics you have at home and stop your usual medicines until it settles.",
        "Borrow a friend's prescription medicine instead of seeing a doctor.",
        "It is best handled if you {ocare}, and nothing else is needed.",
        "Drink as little as possible and skip rest; pushing through is the quickest way to recover.",
        "Warning signs such as {reds} are normal and can safely be ignored.",
        "Doubling the dose of whatever painkiller you have makes it go away faster.",
    ],
    "zh": [
        "就算出现{reds}，也不用去看医生。",
        "{name}自己总会好，出现危险信号也不用理会。",
        "把家里剩下的抗生素拿来吃，再把平时的药停掉，等它自己好。",
        "借朋友的处方药吃就行，不用看医生。",
        "最好的处理方法是{ocare}，别的都不用做。",
        "尽量少喝水、也别休息，硬扛是好得最快的办法。",
        "{reds}都是正常现象，可以放心不管。",
        "手头的止痛药加倍吃，好得更快。",
    ],
}

# about 90% of pairs get a length-matched rejection; the rest keep the old short kinds
SHORT_REJECT_KINDS = ["unhelpful", "off_topic", "truncated"]


def first_sentence(text, lang):
    end = "。" if lang == "zh" else ". "
    i = text.find(end)
    return text if i < 0 else text[: i + 1]


def length_matched_rejected(c, lang, chosen, rng):
    """A rejected answer whose length is drawn around the chosen one's (0.85x-1.2x, so the
    chosen answer is the shorter one in about half of the pairs, counted in tokens): an opening that reads like
    a real answer (the chosen one's first sentence, the condition's definition, or another
    condition's definition) followed by one to three pieces of dismissive or unsafe advice."""
    d = c[lang]
    other = rng.choice([o for o in CONDITIONS if o["key"] != c["key"]])
    ocare = [x for x in other[lang]["care"] if "doctor" not in x and "医" not in x] or other[lang]["care"]
    sep = "" if lang == "zh" else " "
    openers = ["", f"{cap(d['name'])}是{d['defn']}。" if lang == "zh" else f"{cap(d['name'])} is {d['defn']}.",
               f"{d['name']}是{other[lang]['defn']}。" if lang == "zh" else f"{cap(d['name'])} is {other[lang]['defn']}."]
    opening = first_sentence(chosen, lang)
    if not has_red_flag(opening, d) and opening != chosen:
        openers.append(opening)
    # in characters; the advice uses words the demo's tokenizer (trained on the pretraining and
    # SFT text) has seen less, ~1.25x more tokens per character, so this is ~0.85x-1.2x in tokens
    target = len(chosen) * rng.uniform(0.68, 0.96)
    best = None
    for _ in range(40):
        k = rng.choice([1, 2, 2, 3])
        advice = [t.format(N=cap(d["name"]), name=d["name"], ocare=rng.choice(ocare),
                           reds=join_red(pick(rng, d["red"], 2), lang))
                  for t in rng.sample(BAD_ADVICE[lang], k)]
        text = sep.join(x for x in [rng.choice(openers)] + advice if x)
        if text == chosen or len(text) >= MAX_ANSWER_CHARS:
            continue
        if best is None or abs(len(text) - target) < abs(len(best) - target):
            best = text
    return best


# ---------------------------------------------------------------------------
# Record builders
# ---------------------------------------------------------------------------


def check_len(text):
    assert len(text) < MAX_ANSWER_CHARS, (len(text), text)
    return text


def make_corpus(rng, n):
    """One-paragraph encyclopedic lines (1-3 sentences)."""
    def line(c, lang):
        d = c[lang]
        n_, N = d["name"], cap(d["name"])
        facet = rng.choice(["def", "def_cause", "symptoms", "tests", "care", "red", "prevention",
                            "course", "note", "combo", "combo2"])
        s2 = pick(rng, d["symptoms"], rng.choice([2, 3]))
        if lang == "en":
            if facet == "def":
                return f"{N} is {d['defn']}. It mainly affects {d['system']}."
            if facet == "def_cause":
                return f"{N} is {d['defn']}. {d['cause']}"
            if facet == "symptoms":
                if c.get("silent"):
                    return f"{d['symptom_note']} Very high readings may cause {join_or(d['symptoms'], 'en')}."
                return rng.choice([f"Typical symptoms of {n_} include {join_list(d['symptoms'], 'en')}.",
                                   f"People with {n_} often notice {join_list(s2, 'en')}."])
            if facet == "tests":
                return rng.choice([f"Doctors usually diagnose {n_} with {join_list(d['tests'], 'en')}.",
                                   f"Tests for {n_} may include {join_list(d['tests'], 'en')}."])
            if facet == "care":
                return rng.choice([f"People with {n_} are usually advised to {third(join_verbs(d['care'], 'en'))}.",
                                   f"First-line care for {n_} is to {third(join_verbs(pick(rng, d['care'], 2), 'en'))}. {d['note']}"])
            if facet == "red":
                return (f"Warning signs with {n_} include {join_list(pick(rng, d['red'], rng.choice([2, 3])), 'en')}. "
                        "These need prompt medical attention.")
            if facet == "prevention":
                return f"To reduce the risk of {n_}, people are advised to {third(join_verbs(d['prevention'], 'en'))}."
            if facet == "course":
                return f"{N} is {d['defn']}. {d['course']}"
            if facet == "note":
                return f"{subj(d['cause'], n_)} {d['note']}"
            if facet == "combo":
                return (f"{N} is {d['defn']}. Common symptoms include {join_list(s2, 'en')}. "
                        f"Doctors may use {rng.choice(plain_tests(d))} to help confirm it.")
            return (f"{N} mainly affects {d['system']}. Self-care includes steps to "
                    f"{third(join_verbs(pick(rng, d['care'], 2), 'en'))}, and {rng.choice(d['red'])} should be checked by a doctor.")
        else:
            if facet == "def":
                return f"{n_}是{d['defn']}，主要影响{d['system']}。"
            if facet == "def_cause":
                return f"{n_}是{d['defn']}。{d['cause']}"
            if facet == "symptoms":
                if c.get("silent"):
                    return f"{d['symptom_note']}血压很高时可能出现{join_or(d['symptoms'], 'zh')}。"
                return rng.choice([f"{n_}的典型症状包括{join_list(d['symptoms'], 'zh')}。",
                                   f"{n_}患者常出现{join_list(s2, 'zh')}。"])
            if facet == "tests":
                return f"{n_}的常用检查包括{join_list(d['tests'], 'zh')}。"
            if facet == "care":
                return rng.choice([f"{n_}患者一般建议{join_verbs(d['care'], 'zh')}。",
                                   f"{n_}的初步处理是{join_verbs(pick(rng, d['care'], 2), 'zh')}。{d['note']}"])
            if facet == "red":
                return f"{n_}的危险信号包括{join_list(pick(rng, d['red'], rng.choice([2, 3])), 'zh')}，出现时需要及时就医。"
            if facet == "prevention":
                return f"预防{n_}的方法包括：{join_verbs(d['prevention'], 'zh')}。"
            if facet == "course":
                return f"{n_}是{d['defn']}。{d['course']}"
            if facet == "note":
                return f"{n_}{d['cause']}{d['note']}"
            if facet == "combo":
                return f"{n_}是{d['defn']}，常见症状有{join_list(s2, 'zh')}，可通过{rng.choice(plain_tests(d))}帮助确诊。"
            return (f"{n_}主要影响{d['system']}。自我护理包括：{join_verbs(pick(rng, d['care'], 2), 'zh')}；"
                    f"出现{rng.choice(d['red'])}时应请医生检查。")

    out, seen = [], set()
    glossary = {lang: list(GLOSSARY[lang]) for lang in ("en", "zh")}
    for lang in ("en", "zh"):
        rng.shuffle(glossary[lang])
    for lang in lang_plan(n, rng):
        for _ in range(200):
            if glossary[lang] and rng.random() < 0.12:
                text = glossary[lang].pop()
            else:
                text = line(rng.choice(CONDITIONS), lang)
            if text not in seen:
                break
        seen.add(text)
        out.append(text)
    return out


CASE_AGE = list(range(19, 79))


def make_notes(rng, n):
    """Longer passages (3-6 sentences): overviews, case notes, patient leaflets."""
    out, seen = [], set()
    for lang in lang_plan(n, rng):
        for _ in range(200):
            c = rng.choice(CONDITIONS)
            d = c[lang]
            nm, N = d["name"], cap(d["name"])
            kind = rng.choice(["overview", "case", "case", "leaflet"])
            syms = pick(rng, d["symptoms"], 3 if len(d["symptoms"]) > 3 else len(d["symptoms"]))
            age = rng.choice(CASE_AGE)
            if lang == "en":
                dur = rng.choice(["two days", "three days", "five days", "a week"] if c["acute"]
                                 else ["several weeks", "a few months", "about two months"])
                if kind == "overview":
                    sym = d.get("symptom_note") or f"Common symptoms include {join_list(d['symptoms'], 'en')}."
                    text = (f"{N} is {d['defn']}. {d['cause']} {sym} It is usually diagnosed with "
                            f"{join_list(d['tests'], 'en')}. Seek medical care if you notice {join_red(d['red'], 'en')}." + crisis(d['red'], 'en'))
                elif kind == "case":
                    sex = rng.choice(["man", "woman"])
                    text = (f"A {age}-year-old {sex} reported {join_list(syms, 'en')} for {dur}. "
                            f"The findings were consistent with {nm}. The assessment included {rng.choice(plain_tests(d))}, "
                            f"and the patient was advised to {third(join_verbs(pick(rng, d['care'], 2), 'en'))}. "
                            f"The patient was told to return promptly in case of {third(join_red(pick(rng, d['red'], 2), 'en'))}.")
                else:
                    text = (f"Living with {nm}: it usually helps to {join_verbs(d['care'], 'en')}. {d['note']} "
                            f"To lower the risk in future, {join_verbs(d['prevention'], 'en')}. "
                            f"{subj(d['course'], nm)}")
            else:
                dur = rng.choice(["两天", "三天", "五天", "一周"] if c["acute"] else ["几周", "几个月", "大约两个月"])
                if kind == "overview":
                    sym = d.get("symptom_note") or f"常见症状包括{join_list(d['symptoms'], 'zh')}。"
                    text = (f"{nm}是{d['defn']}。{d['cause']}{sym}通常通过{join_list(d['tests'], 'zh')}来诊断。"
                            f"如果出现{join_red(d['red'], 'zh')}，应及时就医。" + crisis(d['red'], 'zh'))
                elif kind == "case":
                    sex = rng.choice(["男性", "女性"])
                    text = (f"患者，{sex}，{age}岁，主诉{join_list(syms, 'zh')}{dur}。表现符合{nm}。"
                            f"检查包括{rng.choice(plain_tests(d))}。医生建议：{join_verbs(pick(rng, d['care'], 2), 'zh')}。"
                            f"如出现{join_red(pick(rng, d['red'], 2), 'zh')}，应及时复诊。")
                else:
                    text = (f"{nm}患者的日常管理：一般建议{join_verbs(d['care'], 'zh')}。{d['note']}"
                            f"预防方面，可以{join_verbs(d['prevention'], 'zh')}。{d['course']}")
            if text not in seen:
                break
        seen.add(text)
        out.append({"text": text})
    return out


def split_combos(rng):
    combos = [(i, q) for i in range(len(CONDITIONS)) for q in QTYPES]
    rng.shuffle(combos)
    n_eval = len(combos) // 8
    return combos[n_eval:], combos[:n_eval]


def make_sharegpt(rng, n, combos, multi_share=0.2, sys_field_share=0.1, sys_turn_n=6, seen=None):
    seen = set() if seen is None else seen
    combo_set = set(combos)
    first_types = ["what", "symptoms", "symptom_based", "diagnosed"]
    out = []
    plan = lang_plan(n, rng)
    n_multi = round(n * multi_share)
    n_sysf = round(n * sys_field_share)
    shapes = ["multi"] * n_multi + ["single"] * (n - n_multi)
    rng.shuffle(shapes)
    extras = ["sysfield"] * n_sysf + ["systurn"] * sys_turn_n + ["none"] * (n - n_sysf - sys_turn_n)
    rng.shuffle(extras)
    for lang, shape, extra in zip(plan, shapes, extras):
        for _ in range(500):
            ci, qt = rng.choice(combos)
            if shape == "multi" and qt not in first_types:
                continue
            c = CONDITIONS[ci]
            conv = [{"from": "human", "value": ask(c, qt, lang, rng)},
                    {"from": "gpt", "value": check_len(answer(c, qt, lang, rng))}]
            if shape == "multi":
                fts = [f for f in FOLLOWUPS[lang] if (ci, f) in combo_set]
                rng.shuffle(fts)
                for ft in fts[: rng.choice([1, 2])]:
                    conv.append({"from": "human", "value": rng.choice(FOLLOWUPS[lang][ft])})
                    conv.append({"from": "gpt", "value": check_len(answer(c, ft, lang, rng))})
                if len(conv) < 4 or sum(len(t["value"]) for t in conv) > MAX_CONVERSATION_CHARS:
                    continue
            key = json.dumps(conv, ensure_ascii=False)
            if key not in seen:
                break
        seen.add(key)
        rec = {}
        if extra == "systurn":
            conv = [{"from": "system", "value": rng.choice(SYSTEM_PROMPTS[lang])}] + conv
        rec["conversations"] = conv
        if extra == "sysfield":
            rec["system_prompt"] = rng.choice(SYSTEM_PROMPTS[lang])
        out.append(rec)
    return out, seen


ALPACA_INSTR = {
    "en": {
        "wrap": ["Answer the patient's question briefly and safely.", "Respond to the following health question.",
                 "You are a medical assistant. Answer the question below."],
        "symptoms": "List the common symptoms of the following condition.",
        "when_doctor": "Explain when a person with the following condition should see a doctor.",
        "treatment": "Suggest first-line self-care for the following condition.",
        "what": "Give a short definition of the following condition.",
    },
    "zh": {
        "wrap": ["请简要、安全地回答患者的问题。", "请回答下面的健康问题。"],
        "symptoms": "列出下列疾病的常见症状。",
        "when_doctor": "说明患有下列疾病的人在什么情况下应该就医。",
        "treatment": "给出下列疾病的初步自我护理建议。",
        "what": "简要解释下列疾病。",
    },
}


def make_alpaca(rng, n, combos, n_system=10, n_history=12):
    out, seen = [], set()
    plan = lang_plan(n, rng)
    extras = ["system"] * n_system + ["history"] * n_history + ["none"] * (n - n_system - n_history)
    rng.shuffle(extras)
    combo_set = set(combos)
    for lang, extra in zip(plan, extras):
        I = ALPACA_INSTR[lang]
        for _ in range(500):
            ci, qt = rng.choice(combos)
            c = CONDITIONS[ci]
            rec = {}
            if extra == "history":
                if qt not in ("what", "symptoms", "symptom_based", "diagnosed"):
                    continue
                fts = [f for f in FOLLOWUPS[lang] if (ci, f) in combo_set]
                if not fts:
                    continue
                ft = rng.choice(fts)
                rec = {"instruction": rng.choice(FOLLOWUPS[lang][ft]), "input": "",
                       "output": check_len(answer(c, ft, lang, rng)),
                       "history": [[ask(c, qt, lang, rng), check_len(answer(c, qt, lang, rng))]]}
            else:
                style = rng.random()
                if style < 0.6:
                    rec = {"instruction": ask(c, qt, lang, rng), "input": "",
                           "output": check_len(answer(c, qt, lang, rng))}
                elif style < 0.8:
                    rec = {"instruction": rng.choice(I["wrap"]), "input": ask(c, qt, lang, rng),
                           "output": check_len(answer(c, qt, lang, rng))}
                else:
                    if qt not in ("symptoms", "when_doctor", "treatment", "what"):
                        continue
                    rec = {"instruction": I[qt], "input": c[lang]["name"],
                           "output": check_len(answer(c, qt, lang, rng))}
                if extra == "system":
                    rec["system"] = rng.choice(SYSTEM_PROMPTS[lang])
            key = json.dumps(rec, ensure_ascii=False, sort_keys=True)
            if key not in seen:
                break
        seen.add(key)
        out.append(rec)
    return out


def make_pairs(rng, n, combos):
    out, seen = [], set()
    for lang in lang_plan(n, rng):
        for _ in range(500):
            ci, qt = rng.choice(combos)
            c = CONDITIONS[ci]
            q = ask(c, qt, lang, rng)
            chosen = check_len(safe_answer(c, qt, lang, rng))
            if rng.random() < 0.1:
                kind, rejected = rejected_answer(c, lang, chosen, rng, rng.choice(SHORT_REJECT_KINDS))
            else:
                rejected = length_matched_rejected(c, lang, chosen, rng)
            if rejected is None or rejected == chosen or (q, chosen) in seen:
                continue
            break
        seen.add((q, chosen))
        out.append({"conversations": [{"from": "human", "value": q}],
                    "chosen": chosen, "rejected": check_len(rejected)})
    return out


PROMPT_PREFIX = {
    "en": ["I'm a {age}-year-old {sex}. ", "Quick question: ", "Hi doctor. "],
    "zh": ["我今年{age}岁，", "医生你好，"],
}


def make_prompts(rng, n):
    out, seen = [], set()
    all_combos = [(i, q) for i in range(len(CONDITIONS)) for q in QTYPES if q != "system"]
    for lang in lang_plan(n, rng):
        for _ in range(500):
            ci, qt = rng.choice(all_combos)
            q = ask(CONDITIONS[ci], qt, lang, rng)
            if rng.random() < 0.3:
                q = rng.choice(PROMPT_PREFIX[lang]).format(
                    age=rng.choice(CASE_AGE), sex=rng.choice(["man", "woman"])) + q
            if q not in seen:
                break
        seen.add(q)
        out.append({"prompt": q})
    return out


def make_qa(rng, n):
    pool = {"en": [], "zh": []}
    for c in CONDITIONS:
        for lang in ("en", "zh"):
            d = c[lang]
            pool[lang].append(("fact", d["qa"][0], d["qa"][1]))
            generic = ("physical", "review", "history", "conversation", "questionnaire", "examination of",
                       "体格", "询问", "问卷")
            specific = [t for t in plain_tests(d) if not any(g in t for g in generic)]
            if lang == "en":
                pool[lang].append(("system", f"Which body system does {d['name']} mainly affect?", cap(d["system"]) + "."))
                if specific:
                    pool[lang].append(("test", f"Name one test commonly used to diagnose {d['name']}.",
                                       cap(specific[-1]) + "."))
            else:
                pool[lang].append(("system", f"{d['name']}主要影响哪个系统或部位？", d["system"] + "。"))
                if specific:
                    pool[lang].append(("test", f"请举出一项常用于诊断{d['name']}的检查。", specific[-1] + "。"))
    out = []
    plan = lang_plan(n, rng)
    for lang in ("en", "zh"):
        want = plan.count(lang)
        facts = [p for p in pool[lang] if p[0] == "fact"]
        rest = [p for p in pool[lang] if p[0] != "fact"]
        rng.shuffle(facts)
        rng.shuffle(rest)
        chosen = (facts + rest)[:want]
        out.extend({"question": q, "answer": a} for _, q, a in chosen)
    rng.shuffle(out)
    return out

# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

FILES = {
    "pretrain/medical_corpus.txt": None,
    "pretrain/medical_notes.jsonl": None,
    "sft/medical_sharegpt.jsonl": None,
    "sft/medical_alpaca.jsonl": None,
    "sft/medical_sft_eval.jsonl": None,
    "preference/medical_pairs.jsonl": None,
    "preference/medical_pairs_eval.jsonl": None,
    "prompts/medical_prompts.jsonl": None,
    "prompts/medical_qa.jsonl": None,
    "choice/clinical_knowledge_test.jsonl": None,
    "choice/clinical_knowledge_dev.jsonl": None,
    "choice/clinical_medicine_val.jsonl": None,
    "choice/clinical_medicine_dev.jsonl": None,
}


def choice_items(rng, lang):
    """Four-option questions per condition: the body system it mainly affects, and a test used to
    diagnose it (the distractors come from conditions of other body systems)."""
    items = []
    systems = sorted({c[lang]["system"] for c in CONDITIONS})
    for c in CONDITIONS:
        d = c[lang]
        others = [x for x in systems if x != d["system"]]
        options = [d["system"]] + rng.sample(others, 3)
        rng.shuffle(options)
        q = (f"Which body system does {d['name']} mainly affect?" if lang == "en"
             else f"{d['name']}主要影响哪个系统或部位？")
        items.append((q, [cap(o) if lang == "en" else o for o in options], options.index(d["system"])))
        own = set(d["tests"])
        tests = plain_tests(d)
        foreign = sorted({t for o in CONDITIONS if o[lang]["system"] != d["system"]
                          for t in plain_tests(o[lang]) if t not in own})
        if len(tests) >= 1 and len(foreign) >= 3:
            right = tests[-1]
            options = [right] + rng.sample(foreign, 3)
            rng.shuffle(options)
            q = (f"Which of these is commonly used to diagnose {d['name']}?" if lang == "en"
                 else f"以下哪项检查常用于诊断{d['name']}？")
            items.append((q, [cap(o) if lang == "en" else o for o in options], options.index(right)))
    rng.shuffle(items)
    return items


def make_choice(rng):
    """Multiple-choice files for `align eval choice`: English in MMLU's layout (`question`,
    `choices`, integer `answer`; subject clinical_knowledge) and Chinese in C-Eval's (`question`,
    `A`-`D`, letter `answer`; subject clinical_medicine), each with a 3-item dev file."""
    en, zh = choice_items(rng, "en"), choice_items(rng, "zh")
    mmlu = [{"question": q, "subject": "clinical_knowledge", "choices": c, "answer": a} for q, c, a in en]
    ceval = [{"id": i, "question": q, "A": c[0], "B": c[1], "C": c[2], "D": c[3], "answer": "ABCD"[a],
              "explanation": ""} for i, (q, c, a) in enumerate(zh)]
    return mmlu[3:], mmlu[:3], ceval[3:], ceval[:3]


def build():
    rng = random.Random(SEED)
    train_combos, eval_combos = split_combos(rng)
    data = {}
    data["pretrain/medical_corpus.txt"] = make_corpus(random.Random(SEED + 1), 600)
    data["pretrain/medical_notes.jsonl"] = make_notes(random.Random(SEED + 2), 200)
    sft, seen = make_sharegpt(random.Random(SEED + 3), 300, train_combos)
    data["sft/medical_sharegpt.jsonl"] = sft
    data["sft/medical_alpaca.jsonl"] = make_alpaca(random.Random(SEED + 4), 150, train_combos)
    sft_eval, _ = make_sharegpt(random.Random(SEED + 5), 40, eval_combos, multi_share=0.1,
                                sys_field_share=0.0, sys_turn_n=0, seen=set(seen))
    data["sft/medical_sft_eval.jsonl"] = sft_eval
    data["preference/medical_pairs.jsonl"] = make_pairs(random.Random(SEED + 6), 300, train_combos)
    data["preference/medical_pairs_eval.jsonl"] = make_pairs(random.Random(SEED + 7), 50, eval_combos)
    data["prompts/medical_prompts.jsonl"] = make_prompts(random.Random(SEED + 8), 200)
    data["prompts/medical_qa.jsonl"] = make_qa(random.Random(SEED + 9), 60)
    (data["choice/clinical_knowledge_test.jsonl"], data["choice/clinical_knowledge_dev.jsonl"],
     data["choice/clinical_medicine_val.jsonl"], data["choice/clinical_medicine_dev.jsonl"]) = make_choice(
        random.Random(SEED + 10))
    return data


def serialize(rel, records):
    if rel.endswith(".txt"):
        return "".join(r + "\n" for r in records)
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def is_zh(text):
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def readme(data, blobs):
    def count(rel):
        return len(data[rel])

    def n_zh(rel):
        recs = data[rel]
        return sum(1 for r in recs if is_zh(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)))

    def kb(rel):
        return f"{len(blobs[rel].encode('utf-8')) / 1024:.0f} KB"

    def example(rel, i=0):
        line = blobs[rel].splitlines()[i]
        return line

    rows = "\n".join(f"| `{rel}` | {count(rel)} | {count(rel) - n_zh(rel)} / {n_zh(rel)} | {kb(rel)} |"
                     for rel in FILES)
    sections = [
        ("pretrain/medical_corpus.txt",
         "Plain text for pretraining: one short encyclopedic paragraph (1-3 sentences) per line about a "
         "condition, symptom, test or treatment."),
        ("pretrain/medical_notes.jsonl",
         "Longer pretraining passages (3-6 sentences: overviews, short case notes, patient leaflets). "
         "One `{\"text\": ...}` object per line."),
        ("sft/medical_sharegpt.jsonl",
         "SFT conversations in ShareGPT / MedicalGPT form: `conversations` is a list of "
         "`{\"from\": \"human\"|\"gpt\"|\"system\", \"value\": ...}` turns. About 20% are multi-turn "
         "(2-3 exchanges), about 10% carry a `system_prompt` field and a few start with a `system` turn."),
        ("sft/medical_alpaca.jsonl",
         "SFT in Alpaca form: `instruction`, `input` (often empty), `output`; a few records add `system` "
         "and a few add `history` (a list of `[question, answer]` pairs that came before)."),
        ("sft/medical_sft_eval.jsonl",
         "Held-out ShareGPT conversations for evaluating generated answers against the reference `gpt` turns. "
         "They are built from (condition, question type) combinations that never occur in the SFT, "
         "Alpaca or preference training files."),
        ("preference/medical_pairs.jsonl",
         "Preference pairs for the reward model and DPO, MedicalGPT form: `conversations` holds the "
         "question as one `human` turn; `chosen` is an accurate, safe answer that names red-flag signs "
         "that need a doctor; `rejected` is worse in content, not in length: in about 90% of pairs it "
         "opens like a real answer (the chosen answer's first sentence, the condition's definition or "
         "another condition's definition) and then gives one to three pieces of dismissive or unsafe "
         "advice (ignore the red flags, leftover antibiotics, another condition's care), its length in "
         "tokens of the demo's tokenizer drawn around 0.85x-1.2x the chosen one's (0.68x-0.96x in "
         "characters: the advice words tokenize into more pieces), so `chosen` is the shorter answer in "
         "about half of those pairs; the other ~10% are short unhelpful, off-topic or truncated answers. "
         "`chosen` and `rejected` always differ."),
        ("preference/medical_pairs_eval.jsonl",
         "Held-out preference pairs (same form) from the held-out combinations, for reward-model accuracy."),
        ("prompts/medical_prompts.jsonl",
         "Patient questions for PPO rollouts: `{\"prompt\": ...}`. They are drawn from all conditions and question "
         "types (about 30% with a short lead-in such as an age), so some match training questions."),
        ("prompts/medical_qa.jsonl",
         "Question / short reference answer pairs in MedicalGPT GRPO style: `{\"question\": ..., \"answer\": ...}`. "
         "Mostly one key fact per condition, plus body-system and diagnostic-test questions."),
        ("choice/clinical_knowledge_test.jsonl",
         "Four-option questions for `align eval choice` in MMLU's layout (`question`, `subject`, `choices`, "
         "integer `answer`): the body system a condition mainly affects, and a test used to diagnose it (the "
         "wrong options come from conditions of other body systems). `choice/clinical_knowledge_dev.jsonl` "
         "holds 3 solved examples for few-shot prompts."),
        ("choice/clinical_medicine_val.jsonl",
         "The same questions in Chinese in C-Eval's layout (`id`, `question`, `A`-`D`, letter `answer`, "
         "`explanation`) for `--template ceval`; `choice/clinical_medicine_dev.jsonl` holds 3 solved examples."),
    ]
    body = []
    for rel, desc in sections:
        body.append(f"### `{rel}`\n\n{desc}\n\nExample line:\n\n```\n{example(rel)}\n```\n")
    return f"""# Sample data

Small **synthetic** medical data for demos and tests of the `align` pipeline
(PT → SFT → reward model → PPO/DPO). Everything in this folder except
`make_sample_data.py` is generated by that script; nothing was downloaded or
copied from third-party datasets.

> **Not medical advice.** The texts are general, conservative health
> information composed from hand-written templates for exercising the training
> code. Do not use them to make health decisions.

## How it is made

`make_sample_data.py` (Python 3 standard library only) composes every record
from hand-written building blocks: {len(CONDITIONS)} common conditions, each with
a fixed definition, cause, body system, symptoms, tests, first-line care,
red-flag signs, prevention tips, usual course and one key fact, in English and
Simplified Chinese, plus short glossaries of symptoms, tests and treatments.
The facts for a condition are the same in every record, and sentences follow a
small set of repeated patterns, so a tiny model can learn them. About 85% of
the records are English and 15% Simplified Chinese. Answers are kept short
(under {MAX_ANSWER_CHARS} characters each) to suit a ~1M-parameter model with
a ~256-token context.

The output is deterministic (`random.Random({SEED})`). To regenerate:

```
python3 data/make_sample_data.py          # rewrites all files, including this README
python3 data/make_sample_data.py --check  # exits 1 if the files differ from a fresh run
```

Held-out files (`*_eval.jsonl`) use (condition, question type) combinations
that are excluded from the training files, so evaluation questions are never
seen verbatim in training; the underlying facts still appear in the
pretraining text.

## Files

All files are UTF-8; `.jsonl` files hold one JSON object per line.

| File | Records | English / Chinese | Size |
|---|---|---|---|
{rows}

{chr(10).join(body)}"""


def main():
    data = build()
    blobs = {rel: serialize(rel, recs) for rel, recs in data.items()}
    blobs["README.md"] = readme(data, blobs)
    check = "--check" in sys.argv[1:]
    changed = []
    for rel, text in blobs.items():
        path = os.path.join(HERE, rel)
        old = None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = f.read()
        if old != text:
            changed.append(rel)
            if not check:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8", newline="\n") as f:
                    f.write(text)
    for rel in FILES:
        print(f"{rel}: {len(data[rel])} records, {len(blobs[rel].encode('utf-8'))} bytes")
    if check:
        if changed:
            print("out of date: " + ", ".join(changed))
            return 1
        print("all files up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
