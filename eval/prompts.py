"""Prompt templates and generation lengths of LongBench and InfiniteBench (restated from their configs), and the
split of a filled template into the instruction, the context and the question that ParallelComp needs.

LongBench: `dataset2prompt` / `dataset2maxlen` of the official repository (English datasets).
InfiniteBench: the completion-style templates its authors use for open models (their "yarn-mistral"
templates) and `DATA_NAME_TO_MAX_NEW_TOKENS`.
"""
from __future__ import annotations

LONGBENCH = {
    # dataset: (template, max new tokens)
    "narrativeqa": ("You are given a story, which can be either a novel or a movie script, and a question. Answer "
                    "the question asconcisely as you can, using a single phrase if possible. Do not provide any "
                    "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely "
                    "as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: "
                    "{input}\n\nAnswer:", 128),
    "qasper": ("You are given a scientific article and a question. Answer the question as concisely as you can, "
               "using a single phrase or sentence if possible. If the question cannot be answered based on the "
               "information in the article, write \"unanswerable\". If the question is a yes/no question, answer "
               "\"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n "
               "Answer the question based on the above article as concisely as you can, using a single phrase or "
               "sentence if possible. If the question cannot be answered based on the information in the article, "
               "write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
               "\"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:", 128),
    "multifieldqa_en": ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
                        "question based on the above text, only give me the answer and do not output any other "
                        "words.\n\nQuestion: {input}\nAnswer:", 64),
    **{name: ("Answer the question based on the given passages. Only give me the answer and do not output any "
              "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
              "given passages. Only give me the answer and do not output any other words.\n\nQuestion: "
              "{input}\nAnswer:", 32) for name in ("hotpotqa", "2wikimqa", "musique")},
    "gov_report": ("You are given a report by a government agency. Write a one-page summary of the report.\n\n"
                   "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:", 512),
    "qmsum": ("You are given a meeting transcript and a query containing a question or instruction. Answer the "
              "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
              "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:", 512),
    "multi_news": ("You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
                   "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:", 512),
    "trec": ("Please determine the type of the question below. Here are some examples of questions.\n\n"
             "{context}\n{input}", 64),
    "triviaqa": ("Answer the question based on the given passage. Only give me the answer and do not output any "
                 "other words. The following are some examples.\n\n{context}\n\n{input}", 32),
    "samsum": ("Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
               "{context}\n\n{input}", 128),
    "passage_count": ("There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
                      "Please carefully read these paragraphs and determine how many unique paragraphs there are "
                      "after removing duplicates. In other words, how many non-repeating paragraphs are there in "
                      "total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing "
                      "duplicates. The output format should only contain the number, such as 1, 2, 3, and so "
                      "on.\n\nThe final answer is: ", 32),
    "passage_retrieval_en": ("Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine "
                             "which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract."
                             "\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. "
                             "The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer "
                             "is: ", 32),
    "lcc": ("Please complete the code given below. \n{context}Next line of code:\n", 64),
    "repobench-p": ("Please complete the code given below. \n{context}{input}Next line of code:\n", 64),
}
# LongBench applies a model's chat template except on these (few-shot and code completion) datasets
LONGBENCH_NO_CHAT = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")

_INFO = "There is an important info hidden inside a lot of irrelevant text. Find it"
INFINITEBENCH = {
    "passkey": (_INFO + " and memorize it. I will quiz you about the important information.\n\n{context}\n\n"
                "{input}\n\nThe pass key is", 6),
    "number_string": (_INFO + ". I will quiz you about the important information there.\n\n{context}\n\n{input}"
                      "\n\nThe sequence of digits is", 12),
    "kv_retrieval": ("Extract the value corresponding to the specified key in the JSON object below.\n\n"
                     "{context}\n\n{input}", 50),
    "longbook_choice_eng": ("Read the book and answer the question.\n\n{context}\n\nQuestion: {input}\n"
                            "A. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\n"
                            "The letter of the correct answer is", 40),
    "longbook_qa_eng": ("Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\n"
                        "Question: {input}\nAnswer:", 40),
    "longdialogue_qa_eng": ("Below is a dialogue script where one random occurrence of a character name is "
                            "replaced with \"$$MASK$$\", and you should try to guess who that character is.\n\n"
                            "{context}\n\nThe name that has been replaced with $$MASK$$ is likely", 40),
}


class PromptError(ValueError):
    """An example that does not fit its benchmark's schema; the message names the field."""


def split_prompt(template: str, fields: dict) -> tuple[str, str, str]:
    """(instruction, context, question) of a filled template: the text before {context} is the instruction,
    which ParallelComp puts in the header every chunk reads; the text after it is the question, which every
    chunk input ends with and which scores the chunks. instruction + context + question is exactly the filled
    template, so full attention reads the official prompt."""
    head, sep, tail = template.partition("{context}")
    if not sep:
        raise PromptError("the template has no {context}")
    try:
        return head.format(**fields), fields["context"], tail.format(**fields)
    except KeyError as e:
        raise PromptError(f"the example has no field {e.args[0]!r} that its template needs") from None
